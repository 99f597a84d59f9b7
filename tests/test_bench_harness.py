"""bench/harness.py: the one row schema, the machine written once, the tables."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
harness = pytest.importorskip("harness")


def test_rows_round_trip_through_the_csv_with_the_machine_once(tmp_path: Path) -> None:
    timing = harness.Timing(minimum=1e-6, median=3e-6, rounds=5, q20=2e-6, q80=4e-6)
    rows = [
        harness.timing_row("suite", "case, batch 1", "dense", timing, "us", threads=1, batch=1),
        harness.value_row("suite", "case, batch 1", "dense", "file_size", "bytes", 1024, sparsity=0.9),
    ]
    assert rows[0].minimum == pytest.approx(1.0) and rows[0].q80 == pytest.approx(4.0)
    assert rows[0].settings() == {"threads": 1, "batch": 1}
    machine = harness.machine_info()
    assert {"platform", "cpu", "torch", "threads", "load_average", "commit"} <= set(machine)
    path = tmp_path / "rows.csv"
    harness.write_csv(path, rows, machine)
    text = path.read_text()
    assert text.count("# torch: ") == 1
    assert text.splitlines()[len(machine)] == ",".join(harness.FIELDS)
    assert harness.read_csv(path) == (machine, rows)


def test_markdown_formats_numbers_and_leaves_text() -> None:
    table = harness.markdown(
        [{"name": "a", "us": 12.345, "bytes": 1234567, "ratio": 1.0}, {"name": "b", "us": 1.0, "ratio": 2.5}],
        ["name", "us", "bytes", "ratio"],
        {"us": ".1f", "bytes": ","},
        floats=".2f",
    )
    assert table.splitlines() == [
        "| name | us | bytes | ratio |",
        "|---|---|---|---|",
        "| a | 12.3 | 1,234,567 | 1.00 |",
        "| b | 1.0 |  | 2.50 |",
    ]
    assert "machine: " in harness.machine_line()
