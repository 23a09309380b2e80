"""The documentation site cannot go stale: every example runs and prints what its page shows.

Every ```python block of docs/**/*.md (and README.md) runs, in page order, in one namespace per page
(a page's examples build on each other), in a temporary working folder (a page needing PyTorch or JAX skips without it). Where the next fenced block
is an output block (```text), the block's printed output must equal it: line by line, trailing
spaces and trailing blank lines ignored.

The number-formatting rule that keeps outputs deterministic: examples print numbers through format
specifications with a fixed precision (``f"{loss:.6f}"``, ``f"{err:.1e}"``, ``np.array2string(g,
precision=4)`` under ``np.printoptions``), never a bare float or an array's repr (repr digits and
NumPy 2's ``np.float64(...)`` vary), and use seeded generators (``np.random.default_rng(0)``).
Pick a precision well above the rounding of the computation (float64 results: 6 to 8 significant
digits), so that a platform's last-bit differences cannot change a printed digit.

Also checked: every public name (``minikd.__all__``, ``minikd.gradcheck.__all__``,
``minikd.testing.__all__`` and ``mk.kernels.softmax_kl``) appears in the API reference (docs/api/),
and the kernel table of docs/guides/kernels.md holds the numbers of the committed benchmark JSON
(``python tests/test_docs.py`` prints the table from the JSON, to paste after a new run).
"""
from __future__ import annotations

import contextlib
import io
import json
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
PAGES = sorted(DOCS.rglob("*.md")) + [ROOT / "README.md"]
FENCE = re.compile(r"^(?P<indent>[ ]*)```(?P<lang>[\w-]*)[^\n]*\n(?P<body>.*?)^(?P=indent)```[ \t]*$", re.M | re.S)
OUTPUT_LANGS = ("text",)
OPTIONAL_FRAMEWORKS = ("torch", "jax", "optax")   # examples needing them skip where they are missing
CPU_JSON = ROOT / "benchmarks" / "results" / "softmax_kl-cpu-x86_64-2cores.json"


def fenced_blocks(text: str):
    """[(lang, body, line, text between the previous block's end and this one's start)]."""
    out, end = [], 0
    for m in FENCE.finditer(text):
        body = "\n".join(line[len(m["indent"]):] for line in m["body"].splitlines())
        out.append((m["lang"], body, text.count("\n", 0, m.start()) + 1, text[end:m.start()]))
        end = m.end()
    return out


def examples(path: Path):
    """[(code, expected output or None, line)] for each python block of the page."""
    blocks = fenced_blocks(path.read_text())
    found = []
    for k, (lang, body, line, _) in enumerate(blocks):
        if lang != "python":
            continue
        expected = None
        if k + 1 < len(blocks) and blocks[k + 1][0] in OUTPUT_LANGS and not blocks[k + 1][3].strip():
            expected = blocks[k + 1][1]
        found.append((body, expected, line))
    return found


def normalized(text: str) -> str:
    return "\n".join(line.rstrip() for line in text.strip("\n").splitlines()).rstrip()


PAGES_WITH_CODE = [p for p in PAGES if examples(p)]


@pytest.mark.parametrize("page", PAGES_WITH_CODE, ids=[str(p.relative_to(ROOT)) for p in PAGES_WITH_CODE])
def test_page_examples(page, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    namespace = {"__name__": "__docs__"}
    for code, expected, line in examples(page):
        where = f"{page.relative_to(ROOT)}:{line}"
        buffer = io.StringIO()
        try:
            with contextlib.redirect_stdout(buffer):
                exec(compile(code, where, "exec"), namespace)   # noqa: S102 (the page's own example)
        except ModuleNotFoundError as error:
            if error.name in OPTIONAL_FRAMEWORKS:   # a page written for PyTorch or JAX users
                pytest.skip(f"{where}: needs {error.name}")
            raise
        if expected is not None:
            got, want = normalized(buffer.getvalue()), normalized(expected)
            assert got == want, f"{where}: the example prints\n{got}\n\nbut the page shows\n{want}"


def test_every_python_block_is_found(tmp_path):
    """The extraction itself: a page with examples yields them, each output block is paired."""
    sample = "x\n\n```python\nprint(1)\n```\n\n```text\n1\n```\n\n```python\na = 2\n```\n\nprose\n\n```text\nno\n```\n"
    page = tmp_path / "page.md"
    page.write_text(sample)
    assert examples(page) == [("print(1)", "1", 3), ("a = 2", None, 11)]
    assert sum(len(examples(p)) for p in PAGES) >= 20, "the site's examples are not being found"


def api_identifiers():
    names = set()
    for page in (DOCS / "api").glob("*.md"):
        names |= set(re.findall(r"^:::[ \t]+([\w.]+)", page.read_text(), re.M))
    return names


def test_public_names_in_api_reference():
    import minikd
    import minikd.gradcheck
    import minikd.testing
    documented = api_identifiers()
    last = {name.rsplit(".", 1)[-1] for name in documented}
    missing = [n for n in minikd.__all__ if n not in last]
    assert not missing, f"minikd.__all__ names missing from the API reference (docs/api/*.md): {missing}"
    for module in (minikd.gradcheck, minikd.testing):
        prefix = module.__name__ + "."
        missing = [n for n in module.__all__ if prefix + n not in documented]
        assert not missing, f"{module.__name__} names missing from docs/api/testing.md: {missing}"
    assert "kernels.softmax_kl" in documented, "mk.kernels.softmax_kl is missing from docs/api/kernels.md"
    # each identifier names the object that minikd exports under that name
    for name in documented:
        module, _, attr = name.rpartition(".")
        module = "minikd.kernels" if module == "kernels" else module
        obj = getattr(__import__(module, fromlist=[attr]), attr)
        if attr in minikd.__all__ and module.startswith("minikd."):
            assert getattr(minikd, attr) is obj, f"{name} is not mk.{attr}"


# ---------------------------------------------------------------- the kernel table

def _ms(x: float) -> str:
    """Three significant digits, as the tables print milliseconds."""
    return f"{x:.0f}" if x >= 100 else f"{x:#.3g}"


def cpu_kernel_table(data: dict) -> str:
    lines = ["| shape | floor | Numba | NumPy ref | PyTorch eager | torch.compile (compile s) |",
             "|---|---|---|---|---|---|"]
    for r in data["rows"]:
        def cell(ms_key, pct_key):
            return f"{_ms(r[ms_key])} ({r[pct_key]:.1f}%)"
        lines.append(f"| ({r['N']}, {r['C']}) | {r['floor_ms']:.2f} | {cell('numba_ms', 'numba_pct_floor')} | "
                     f"{cell('numpy_ms', 'numpy_pct_floor')} | {cell('torch_eager_ms', 'eager_pct_floor')} | "
                     f"{cell('torch_compile_ms', 'compile_pct_floor')} ({r['torch_compile_s']:.1f}) |")
    return "\n".join(lines)


def test_kernel_table_matches_committed_json():
    data = json.loads(CPU_JSON.read_text())
    page = (DOCS / "guides" / "kernels.md").read_text()
    table = cpu_kernel_table(data)
    assert table in page, ("docs/guides/kernels.md: the CPU kernel table differs from "
                           f"{CPU_JSON.relative_to(ROOT)}; paste `python tests/test_docs.py`'s table:\n{table}")
    bandwidth = f"{data['copy_bandwidth_GBps']:.1f} GB/s on {data['copy_threads']} threads"
    assert bandwidth in page, f"docs/guides/kernels.md: expected the copy bandwidth '{bandwidth}'"


if __name__ == "__main__":
    print(cpu_kernel_table(json.loads(CPU_JSON.read_text())))
    sys.exit(0)
