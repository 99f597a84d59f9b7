"""The ``ecp-fast`` command line: ``demo`` and the plug-in ``experiment`` group.

::

    ecp-fast demo --out runs/demo --seeds 3
    ecp-fast experiment --help            # lists the experiments found in ecp_fast/experiments/
    python -m ecp_fast demo --quick
"""

from __future__ import annotations

import argparse
import importlib
import logging
import pkgutil
import sys
from types import ModuleType
from typing import Sequence

logger = logging.getLogger(__name__)

EXPERIMENT_PACKAGE = "ecp_fast.apps.experiments"
_EXPERIMENT_ATTRIBUTES = ("NAME", "HELP", "add_arguments", "run")


def discover_experiments() -> dict[str, ModuleType]:
    """``{NAME: module}`` for every module of :mod:`ecp_fast.apps.experiments` that follows the contract."""
    package = importlib.import_module(EXPERIMENT_PACKAGE)
    experiments: dict[str, ModuleType] = {}
    for info in pkgutil.iter_modules(package.__path__):
        if info.name.startswith("_"):
            continue
        qualified = f"{EXPERIMENT_PACKAGE}.{info.name}"
        try:
            module = importlib.import_module(qualified)
        except Exception as error:  # one broken experiment must not break the command line
            logger.warning("skipping experiment module %s: import failed (%s)", qualified, error)
            continue
        missing = [attribute for attribute in _EXPERIMENT_ATTRIBUTES if not hasattr(module, attribute)]
        if missing:
            logger.warning("skipping experiment module %s: it lacks %s", qualified, ", ".join(missing))
            continue
        if module.NAME in experiments:
            logger.warning("skipping experiment module %s: name %r is taken", qualified, module.NAME)
            continue
        experiments[module.NAME] = module
    return experiments


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every subcommand (experiments discovered now)."""
    from ecp_fast.apps import demo

    parser = argparse.ArgumentParser(
        prog="ecp-fast", description="Elimination-compensation pruning (ECP) for PyTorch."
    )
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-v info, -vv debug)")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    commands.required = True

    demo_parser = commands.add_parser("demo", help=demo.HELP, description=demo.__doc__)
    demo.add_arguments(demo_parser)
    demo_parser.set_defaults(handler=demo.run)

    experiment_parser = commands.add_parser(
        "experiment", help="run a registered experiment", description="Experiments found in ecp_fast/experiments/."
    )
    experiment_commands = experiment_parser.add_subparsers(dest="experiment", metavar="EXPERIMENT")
    experiment_commands.required = True
    for name, module in sorted(discover_experiments().items()):
        sub = experiment_commands.add_parser(name, help=module.HELP, description=module.__doc__)
        module.add_arguments(sub)
        sub.set_defaults(handler=module.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``ecp-fast`` and ``python -m ecp_fast``; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    level = logging.WARNING - 10 * min(args.verbose, 2)
    logging.basicConfig(level=level, format="%(asctime)s %(name)s %(levelname)s: %(message)s")
    return int(args.handler(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
