"""The benchmark and GPU-check commands: the GPU check says in one line that there is no GPU,
and its whole code runs on the CPU at tiny sizes (so that the first GPU it meets runs it);
the benchmark's report has every section (tests/test_readme_commands.py runs make bench as
python scripts/bench.py --quick)."""

import pytest
import torch
from conftest import load_script


def test_without_a_gpu_the_check_says_so_in_one_line_and_succeeds(capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert load_script("gpu_check").main([]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert out == ["gpu_check: no CUDA device here: nothing to measure (make gpu-check on a GPU)"]


@pytest.mark.slow
def test_every_part_of_the_gpu_check_runs_on_the_cpu(tmp_path, capsys):
    out = tmp_path / "gpu.md"
    assert load_script("gpu_check").main(["--dry-run", "--out", str(out)]) == 0
    report = out.read_text()
    for title in load_script("gpu_check").PARTS:
        assert f"## {title}" in report
    assert "FAILED" not in report and "4/4 parts done" in capsys.readouterr().out
    assert "| upper_bound | 5 | n/a | n/a (CPU) |" in report
    assert "status completed" in report


def test_the_benchmark_pages_tables_are_the_committed_reports():
    """docs/benchmarks.md quotes results/bench_cpu.md (make bench) row for row: every table
    row of its first five sections is in the report."""
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    page = (root / "docs" / "benchmarks.md").read_text()
    report = (root / "results" / "bench_cpu.md").read_text().splitlines()
    sections = page.split("\n## ")[1:6]
    assert [s.splitlines()[0] for s in sections] == [
        "The step",
        "The exact gradient norm",
        "Loading",
        "Two ranks against one",
        "Evaluation",
    ]
    rows = [
        line
        for section in sections
        for line in section.splitlines()
        if line.startswith("| ") and not line.startswith("|---")
    ]
    assert len(rows) >= 15
    missing = [row for row in rows if row not in report]
    assert not missing
