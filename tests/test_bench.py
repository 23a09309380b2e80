"""The benchmark harness itself (its measurements are scripts, never tests)."""
import shutil
from pathlib import Path


def test_bench_plot_redraws_a_committed_result(tmp_path):
    """`python benchmarks/softmax_kl.py --plot JSON` (for results measured where matplotlib was
    missing): the committed CPU and GPU results are redrawn next to copies of them."""
    from softmax_kl import main
    results = Path(__file__).parent.parent / "benchmarks" / "results"
    for name in ("softmax_kl-cpu-x86_64-2cores.json", "softmax_kl-gpu-NVIDIA-H200.json"):
        shutil.copy(results / name, tmp_path / name)
        assert main(["--plot", str(tmp_path / name)]) == 0
        assert (tmp_path / name).with_suffix(".png").stat().st_size > 10_000


def test_benchmarks_never_write_committed_results_by_default():
    """Results go where the user says; by default to bench-out/, never over benchmarks/results."""
    from softmax_kl import build_parser
    assert build_parser().parse_args([]).out == "bench-out"
    script = (Path(__file__).parent.parent / "benchmarks" / "gpu_check.sh").read_text()
    assert "OUT=${OUT:-bench-out}" in script


def test_minikd_never_imports_the_benchmarks():
    """minikd is a library: no module of it imports the benchmark scripts (they import minikd)."""
    package = Path(__file__).parent.parent
    names = ("harness", "softmax_kl_gpu", "plots import benchmark", "benchmarks")
    for path in [*(package / "minikd").rglob("*.py"), *(package / "kernels").rglob("*.py")]:
        imports = [line for line in path.read_text().splitlines() if line.lstrip().startswith(("import ", "from "))]
        assert not [line for line in imports if any(n in line for n in names)], path


def test_the_gpu_benchmark_without_cupy_is_one_line(monkeypatch, capsys):
    """`softmax_kl.py --gpu` where CuPy is missing: what to install, not an import traceback."""
    import sys

    from softmax_kl import main
    monkeypatch.setitem(sys.modules, "cupy", None)   # import cupy raises ImportError
    assert main(["--gpu"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "CuPy is not installed: pip install" in err
