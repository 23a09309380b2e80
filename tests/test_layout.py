"""The package's layout: the fused kernels live in the checkout's top-level kernels/ folder and are
imported as minikd.kernels, on first use; the wheel path is checked by .ci/run."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def run_python(code, **env):
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT / "tests",
                          env={**os.environ, **env}, check=True).stdout


def test_import_minikd_loads_neither_the_kernels_nor_numba():
    out = run_python(
        "import sys, numpy as np, minikd as mk\n"
        "print('numba' in sys.modules, 'minikd.kernels' in sys.modules)\n"
        "s = np.linspace(-2, 2, 30).reshape(3, 10)\n"
        "loss, grad = mk.kernels.softmax_kl(s, s[::-1].copy(), np.arange(3), T=2.0, alpha=0.5, backend='numba')\n"
        "ref, gref = mk.kd_loss_and_grad(s, s[::-1].copy(), np.arange(3), T=2.0, alpha=0.5)\n"
        "print(abs(loss - ref) < 1e-12, abs(grad - gref).max() < 1e-12, 'numba' in sys.modules)\n")
    assert out.split() == ["False", "False", "True", "True", "True"]


def test_a_checkout_without_install_finds_the_kernels():
    """PYTHONPATH=<checkout> and no install (how benchmarks/gpu_check.sh runs on a lent GPU): the
    install's finder is taken away first, so minikd/__init__.py's own finder must supply the module."""
    out = run_python(
        "import sys\n"
        "sys.meta_path[:] = [f for f in sys.meta_path if '__editable__' not in getattr(f, '__module__', '')]\n"
        "import minikd\n"
        "from minikd.kernels.cupy_gpu import SOURCE\n"
        "print(minikd.kernels.__file__, SOURCE.exists())\n", PYTHONPATH=str(ROOT))
    path, exists = out.split()
    assert Path(path) == ROOT / "kernels" / "__init__.py" and exists == "True"


def test_a_stale_minikd_kernels_folder_does_not_shadow_the_kernels(tmp_path):
    """An older checkout kept the kernels in minikd/kernels/; its ignored __pycache__ survives a pull
    (and survived on a lent GPU machine) and would import as an empty namespace package."""
    for name in ("minikd", "kernels"):
        shutil.copytree(ROOT / name, tmp_path / name, ignore=shutil.ignore_patterns("__pycache__"))
    (tmp_path / "minikd" / "kernels" / "__pycache__").mkdir(parents=True)
    out = run_python(
        "import sys\n"
        "sys.meta_path[:] = [f for f in sys.meta_path if '__editable__' not in getattr(f, '__module__', '')]\n"
        "from minikd.kernels import softmax_kl\n"
        "import minikd\n"
        "print(minikd.kernels.__file__)\n", PYTHONPATH=str(tmp_path))
    assert Path(out.strip()) == tmp_path / "kernels" / "__init__.py"
