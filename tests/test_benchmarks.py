"""Every benchmark section of `make bench` (benchmarks/bench.py's TABLE) runs end to end at its
tiny sizes (the module's SMOKE arguments) and gives markdown tables whose cells hold finite
numbers; and bench.py's driver writes where it is told, keeps the text of the sections it did not
run, and still writes the others when one section raises. A smoke test of the code, not a timing:
no figure is compared with anything."""
import re
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
if str(BENCHMARKS) not in sys.path:
    sys.path.insert(0, str(BENCHMARKS))

import bench  # noqa: E402

SEPARATOR = re.compile(r":?-{3,}:?")
NUMBER = re.compile(r"(?<![\w.])[-+]?(?:\d[\d,]*(?:\.\d+)?|\.\d+)(?:e[-+]?\d+)?(?![\w.])", re.IGNORECASE)
NON_FINITE = re.compile(r"\b(?:nan|inf|infinity)\b", re.IGNORECASE)
NEEDS_RAY = {"ray", "generation"}     # sections whose smoke runs start Ray jobs


def table_rows(markdown: str) -> list[list[str]]:
    """The cells of every table row below a header's separator line."""
    rows, in_table = [], False
    for line in markdown.splitlines():
        line = line.strip()
        if not line.startswith("|"):
            in_table = False
            continue
        cells = [c.strip() for c in line.strip("|").split("|")]
        if all(SEPARATOR.fullmatch(c) for c in cells):
            in_table = True
        elif in_table:
            rows.append(cells)
    return rows


def test_table_rows_reads_the_rows_below_each_separator():
    md = "text\n\n| a | b |\n|---|---:|\n| x | 1.5 |\n| y | nan |\n\nmore\n| c |\n|---|\n| 3 |"
    assert table_rows(md) == [["x", "1.5"], ["y", "nan"], ["3"]]
    assert NON_FINITE.search("| y | nan |") and not NON_FINITE.search("| finance | 1 |")
    assert NUMBER.findall("| 1,234 | 0.5 ms | 2.1e+05 | 3.2 x | 4 x 4 | v2 |") == ["1,234", "0.5", "2.1e+05", "3.2", "4", "4"]


@pytest.fixture(scope="module")
def embedded_ray():
    """One embedded Ray for the sections that run Ray jobs: each job reuses it instead of starting
    its own (ray_connection reuses a connection the process has), which saves ~15 s a job here."""
    from geomjobs.runner.ray_connect import ray_connection

    with ray_connection("local", num_cpus=2):
        yield


# sdxl's smoke run (~15 s) is slow: tests/test_sdxl.py runs the SDXL models' jobs in the default run, and
# bench_sdxl's planning (abstract params, remat variants) runs in `make test-slow`
@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n == "sdxl" else n for n in bench.ALL])
def test_every_section_runs_at_tiny_sizes_and_gives_finite_table_rows(name, request):
    if name in NEEDS_RAY:
        request.getfixturevalue("embedded_ray")
    mod = bench.load(name)
    text = mod.run(bench.section_args(mod, smoke=True))
    assert isinstance(text, str) and text.strip()
    # bench.py adds the section's "## title"; one inside the text would split the section when it is read back
    assert not [line for line in text.splitlines() if line.startswith("## ")]
    rows = table_rows(text)
    assert rows, f"section {name} gave no table rows:\n{text}"
    for row in rows:
        line = " | ".join(row)
        assert not NON_FINITE.search(line), f"section {name}: non-finite value in row {row}"
        numbers = [float(x.replace(",", "")) for x in NUMBER.findall(line)]
        assert numbers, f"section {name}: a row without a number: {row}"


class _Section:
    """A stand-in section module: parse records its arguments, run returns a table or raises."""

    def __init__(self, value, fail=False):
        self.SMOKE, self.value, self.fail, self.argv = ["--tiny"], value, fail, None

    def parse(self, argv):
        self.argv = argv
        return argv

    def run(self, args):
        if self.fail:
            raise RuntimeError("boom")
        return f"| x | y |\n|---|---|\n| a | {self.value} |"


def test_the_driver_writes_to_out_keeps_sections_not_run_and_survives_a_failing_one(tmp_path, monkeypatch):
    first, second, third = bench.ALL[:3]
    t1, t2, t3 = (bench.TABLE[n][0] for n in (first, second, third))
    out = tmp_path / "B.md"
    out.write_text(f"# Benchmarks\n\n## {t2}\n\nkept text of {second}\n\n## PyTorch peer\n\npeer text\n\n"
                   f"## {t3}\n\nold text of {third}\n")
    fakes = {first: _Section(1.5), third: _Section(0, fail=True)}
    monkeypatch.setattr(bench, "load", lambda name: fakes[name])
    monkeypatch.chdir(tmp_path)
    assert bench.main(["--only", first, third, "--smoke", "--out", str(out)]) == 1   # the failing section sets the status
    text = out.read_text()
    assert fakes[first].argv == ["--tiny"]                                            # --smoke: the module's SMOKE
    assert f"## {t1}\n\n| x | y |\n|---|---|\n| a | 1.5 |" in text
    assert f"## {t2}\n\nkept text of {second}" in text                                # not run: kept
    assert f"## {t3}\n\nold text of {third}" in text                                  # failed: its earlier text kept
    assert text.index(t1) < text.index(t2) < text.index(t3)                           # TABLE's order
    assert "## PyTorch peer\n\npeer text" in text and text.index(t3) < text.index("PyTorch peer")   # another tool's: kept, last
    assert sorted(p.name for p in tmp_path.iterdir()) == ["B.md"]

    fakes[third] = _Section(2.5)
    assert bench.main(["--only", third]) == 0 and fakes[third].argv == []              # defaults; --out BENCHMARKS.md
    assert "| a | 2.5 |" in (tmp_path / "BENCHMARKS.md").read_text()                  # ... relative to the cwd (tmp)
    (tmp_path / "BENCHMARKS.md").unlink()
    assert bench.main(["--only", first, "--smoke"]) == 0                               # --smoke without --out: printed only
    assert sorted(p.name for p in tmp_path.iterdir()) == ["B.md"]

