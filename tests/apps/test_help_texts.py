"""``--help`` of the command line, of every subcommand and of every experiment prints and exits with status 0.

argparse %-formats help strings, so a literal ``%`` in one (a default such as ``50%:row``) crashes
``--help`` with ``ValueError: unsupported format character``; every parser is walked here.
"""

from __future__ import annotations

import argparse
import warnings

import pytest

with warnings.catch_warnings():
    warnings.simplefilter("ignore", RuntimeWarning)
    from ecp_fast.apps import cli

#: Experiments shipped in ecp_fast/apps/experiments/ (a module that fails to load must not drop out unnoticed).
SHIPPED_EXPERIMENTS = {"diffusion-sorption", "lm", "mnist", "regularized"}


def _command_paths(parser: argparse.ArgumentParser, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    """Every command path below ``parser``: ``()``, ``("demo",)``, ``("experiment", "lm")``, ..."""
    paths = [prefix]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                paths.extend(_command_paths(sub, (*prefix, name)))
    return paths


COMMAND_PATHS = _command_paths(cli.build_parser())


def test_every_shipped_command_and_experiment_is_walked():
    walked = set(COMMAND_PATHS)
    assert {(), ("demo",), ("export",), ("experiment",)} <= walked
    assert {("experiment", name) for name in SHIPPED_EXPERIMENTS} <= walked


@pytest.mark.parametrize("path", COMMAND_PATHS, ids=lambda path: " ".join(path) or "ecp-fast")
def test_help_prints_and_exits_0(path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main([*path, "--help"])
    assert exit_info.value.code == 0
    captured = capsys.readouterr()
    assert captured.err == ""
    assert captured.out.startswith(f"usage: {' '.join(('ecp-fast', *path))}")
    if path:
        assert path[-1] in captured.out
