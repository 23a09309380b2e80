"""The benchmark harness itself (its measurements are scripts, never tests)."""
import shutil
from pathlib import Path


def test_bench_plot_redraws_a_committed_result(tmp_path):
    """`minikd bench --plot JSON` (for results measured where matplotlib was missing): the committed
    CPU result is redrawn next to a copy of it."""
    from minikd.bench import main
    src = Path(__file__).parent.parent / "benchmarks" / "results" / "softmax_kl-cpu-x86_64-2cores.json"
    shutil.copy(src, tmp_path / src.name)
    assert main(["--plot", str(tmp_path / src.name)]) == 0
    assert (tmp_path / src.name).with_suffix(".png").stat().st_size > 10_000
