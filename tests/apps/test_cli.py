"""The command line: the quick demo writes its table, CSV and plot; experiments plug in by discovery."""

from __future__ import annotations

import argparse
import csv
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest

with warnings.catch_warnings():
    warnings.simplefilter("ignore", RuntimeWarning)
    from ecp_fast.apps import cli
from ecp_fast.apps.experiments._common import RECONSTRUCTIVE_RUNS
from ecp_fast.pruning.importance import IMPORTANCES

REPO = Path(__file__).resolve().parents[2]


def test_quick_demo_writes_table_csv_and_plot(tmp_path, capsys):
    out = tmp_path / "demo"
    assert cli.main(["demo", "--quick", "--out", str(out)]) == 0
    table = capsys.readouterr().out
    for method in (*IMPORTANCES, *RECONSTRUCTIVE_RUNS):
        assert f"\n{method} " in table, f"{method} missing from the demo table"
    assert "ecp (steps=5)" in table and "dense" in table
    assert (out / "loss_vs_sparsity.png").stat().st_size > 1000
    with (out / "summary.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    labels = {row["method"] for row in rows}
    assert labels == set(IMPORTANCES) | set(RECONSTRUCTIVE_RUNS) | {"dense", "ecp (steps=5)"}
    for row in rows:
        assert 0.0 <= float(row["test_accuracy_mean"]) <= 1.0 and float(row["test_loss_mean"]) > 0
    with (out / "results.csv").open() as handle:
        assert {"method", "steps", "sparsity", "seed", "test_loss", "test_accuracy"} <= set(next(csv.reader(handle)))


def test_experiments_are_discovered_without_editing_the_cli(tmp_path, monkeypatch):
    package = tmp_path / "plugin_experiments_for_test"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "echo.py").write_text(
        textwrap.dedent(
            """
            NAME = "echo"
            HELP = "prints its argument"

            def add_arguments(parser):
                parser.add_argument("--word", default="hello")

            def run(args):
                print("echo:", args.word)
                return 3
            """
        )
    )
    (package / "incomplete.py").write_text("NAME = 'incomplete'\n")
    (package / "broken.py").write_text("raise ImportError('missing dependency')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(cli, "EXPERIMENT_PACKAGE", "plugin_experiments_for_test")
    assert set(cli.discover_experiments()) == {"echo"}
    assert cli.main(["experiment", "echo", "--word", "pruned"]) == 3
    assert set(cli.SKIPPED_EXPERIMENTS) == {
        "plugin_experiments_for_test.broken",
        "plugin_experiments_for_test.incomplete",
    }
    with pytest.raises(SystemExit) as info:
        cli.main(["experiment", "broken"])
    assert info.value.code == 2 and "broken: import failed (missing dependency)" in str(info.value)


def test_parser_has_the_subcommands():
    parser = cli.build_parser()
    assert isinstance(parser, argparse.ArgumentParser)
    with pytest.raises(SystemExit):
        parser.parse_args([])
    args = parser.parse_args(["demo", "--seeds", "2", "--out", "x"])
    assert args.seeds == 2 and args.out == Path("x")


def test_python_dash_m_runs_the_command_line():
    result = subprocess.run(
        [sys.executable, "-W", "ignore", "-m", "ecp_fast", "--help"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0
    assert "demo" in result.stdout and "experiment" in result.stdout


def test_console_script_gives_one_line_user_errors(tmp_path):
    """The installed ``ecp-fast`` script (pyproject: ``ecp_fast.apps.cli:main``), when it is current."""
    script = Path(sys.executable).parent / "ecp-fast"
    if not script.is_file() or "ecp_fast.apps.cli" not in script.read_text():
        pytest.skip(f"{script} is missing or stale (reinstall: pip install --no-build-isolation -e .)")
    blocker = tmp_path / "file"
    blocker.write_text("")
    result = subprocess.run(
        [str(script), "demo", "--quick", "--out", str(blocker)], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 2 and result.stderr.count("\n") == 1 and "is a file" in result.stderr


def test_export_is_a_subcommand() -> None:
    parser = cli.build_parser()
    args = parser.parse_args(["export", "checkpoint.pt", "--arch", "mlp:4,3,2"])
    assert args.command == "export" and callable(args.handler)
