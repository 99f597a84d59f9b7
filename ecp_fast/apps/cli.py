"""The ``ecp-fast`` command line: ``demo`` and the plug-in ``experiment`` group.

::

    ecp-fast demo --out runs/demo --seeds 3
    ecp-fast experiment --help            # lists the experiments found in ecp_fast/apps/experiments/
    python -m ecp_fast demo --quick

User errors (a malformed option, a missing, truncated or corrupt data file, an ``--out`` that is a
file or cannot be created) print ONE line on stderr, ``ecp-fast ...: error: ...``, and exit with
status 2, like argparse's own errors. They are found before the run starts: the options, the
output folders and the data files are checked first (an experiment's optional ``validate(args)``
does its part), then the folders are created, then the run begins.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import pkgutil
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any, NoReturn

from ecp_fast.apps.errors import UsageError

__all__ = ["UsageError", "UsageExit", "build_parser", "main"]

logger = logging.getLogger(__name__)

EXPERIMENT_PACKAGE = "ecp_fast.apps.experiments"
_EXPERIMENT_ATTRIBUTES = ("NAME", "HELP", "add_arguments", "run")
#: Options that name an output folder: checked before the run, then created.
OUTPUT_DIRECTORIES = {"out": "--out", "cache_dir": "--cache-dir"}
#: Exit status of a user error (argparse's).
USAGE_STATUS = 2


class UsageExit(SystemExit):
    """Exit with status 2 after a user error; ``str()`` is the message (already printed)."""

    def __init__(self, message: str) -> None:
        super().__init__(USAGE_STATUS)
        self.message = message

    def __str__(self) -> str:
        return self.message


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (no usage block), exit status 2."""

    def error(self, message: str) -> NoReturn:
        if "invalid choice" in message and SKIPPED_EXPERIMENTS:
            message += f" (experiments that could not be loaded: {_skipped_note()})"
        _fail(self.prog, f"{message} (see --help)")


def _fail(prog: str, message: str) -> NoReturn:
    line = f"{prog}: error: {' '.join(str(message).split())}"
    sys.stderr.write(line + "\n")
    sys.stderr.flush()
    raise UsageExit(line)


#: Experiment modules the last discovery skipped, with the reason (shown by ``--help`` and in errors).
SKIPPED_EXPERIMENTS: dict[str, str] = {}


def _skip(qualified: str, reason: str) -> None:
    # INFO, not WARNING: a broken plug-in must not add lines to another command's output or error;
    # ``experiment --help`` lists it, and so does the error for an unknown experiment.
    SKIPPED_EXPERIMENTS[qualified] = reason
    logger.info("skipping experiment module %s: %s", qualified, reason)


def discover_experiments() -> dict[str, ModuleType]:
    """``{NAME: module}`` for every module of :mod:`ecp_fast.apps.experiments` that follows the contract.

    Modules that fail to import or lack part of the contract are skipped and recorded in
    :data:`SKIPPED_EXPERIMENTS`.
    """
    package = importlib.import_module(EXPERIMENT_PACKAGE)
    experiments: dict[str, ModuleType] = {}
    SKIPPED_EXPERIMENTS.clear()
    for info in pkgutil.iter_modules(package.__path__):
        if info.name.startswith("_"):
            continue
        qualified = f"{EXPERIMENT_PACKAGE}.{info.name}"
        try:
            module = importlib.import_module(qualified)
        except Exception as error:  # one broken experiment must not break the command line
            _skip(qualified, f"import failed ({error})")
            continue
        missing = [attribute for attribute in _EXPERIMENT_ATTRIBUTES if not hasattr(module, attribute)]
        if missing:
            _skip(qualified, f"it lacks {', '.join(missing)}")
        elif module.NAME in experiments:
            _skip(qualified, f"name {module.NAME!r} is taken")
        else:
            experiments[module.NAME] = module
    return experiments


def _skipped_note() -> str:
    return "; ".join(f"{name.rsplit('.', 1)[-1]}: {reason}" for name, reason in SKIPPED_EXPERIMENTS.items())


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every subcommand (experiments discovered now)."""
    from ecp_fast.apps import demo, export_command

    parser = _Parser(prog="ecp-fast", description="Elimination-compensation pruning (ECP) for PyTorch.")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-v info, -vv debug)")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    commands.required = True

    demo_parser = commands.add_parser("demo", help=demo.HELP, description=demo.__doc__)
    demo.add_arguments(demo_parser)
    demo_parser.set_defaults(
        handler=demo.run, command_validate=getattr(demo, "validate", None), command_prog=demo_parser.prog
    )

    export_parser = commands.add_parser(
        export_command.NAME,
        help=export_command.HELP,
        description=export_command.__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    export_command.add_arguments(export_parser)
    export_parser.set_defaults(
        handler=export_command.run,
        command_validate=getattr(export_command, "validate", None),
        command_prog=export_parser.prog,
    )

    experiment_parser = commands.add_parser(
        "experiment", help="run a registered experiment", description="Experiments found in ecp_fast/apps/experiments/."
    )
    experiment_commands = experiment_parser.add_subparsers(dest="experiment", metavar="EXPERIMENT")
    experiment_commands.required = True
    experiments = discover_experiments()
    if SKIPPED_EXPERIMENTS:
        experiment_parser.epilog = f"Skipped experiment modules: {_skipped_note()}"
    for name, module in sorted(experiments.items()):
        sub = experiment_commands.add_parser(name, help=module.HELP, description=module.__doc__)
        module.add_arguments(sub)
        sub.set_defaults(handler=module.run, command_validate=getattr(module, "validate", None), command_prog=sub.prog)
    return parser


def check_output_directory(path: Any, option: str) -> Path:
    """``path`` as a folder that exists or can be created; ``UsageError`` naming ``option`` otherwise.

    Nothing is created here (see :func:`create_output_directories`).
    """
    if not isinstance(path, (str, os.PathLike)) or not str(path):
        raise UsageError(f"{option} must be a folder path, got {path!r}")
    folder = Path(path).expanduser()
    if folder.exists():
        if not folder.is_dir():
            raise UsageError(f"{option} '{path}' is a file, expected a folder")
        if not os.access(folder, os.W_OK | os.X_OK):
            raise UsageError(f"{option} '{path}' is not writable")
        return folder
    ancestor = folder.absolute().parent
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise UsageError(f"{option} '{path}' cannot be created: '{ancestor}' is a file")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise UsageError(f"{option} '{path}' cannot be created: '{ancestor}' is not writable")
    return folder


def create_output_directories(args: argparse.Namespace) -> None:
    """Create every output folder the arguments name; ``UsageError`` when one cannot be."""
    for attribute, option in OUTPUT_DIRECTORIES.items():
        value = getattr(args, attribute, None)
        if value is None:
            continue
        try:
            Path(value).expanduser().mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise UsageError(f"{option} '{value}' cannot be created: {error.strerror or error}") from error


def validate(args: argparse.Namespace) -> None:
    """Every check that can be made before a run: output folders, then the command's own ``validate``."""
    for attribute, option in OUTPUT_DIRECTORIES.items():
        value = getattr(args, attribute, None)
        if value is not None:
            check_output_directory(value, option)
    command_validate: Callable[[argparse.Namespace], None] | None = getattr(args, "command_validate", None)
    if command_validate is not None:
        command_validate(args)
    create_output_directories(args)


def _user_errors() -> tuple[type[BaseException], ...]:
    from ecp_fast.apps.datasets import DataFileError

    return (UsageError, DataFileError)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``ecp-fast`` and ``python -m ecp_fast``; returns the exit status.

    A user error prints one line on stderr and raises :class:`UsageExit` (a ``SystemExit`` with
    status 2), as argparse does for a bad option.
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    level = logging.WARNING - 10 * min(args.verbose, 2)
    logging.basicConfig(level=level, format="%(asctime)s %(name)s %(levelname)s: %(message)s")
    prog = getattr(args, "command_prog", parser.prog)
    try:
        validate(args)
    except _user_errors() + (OSError,) as error:  # missing or unreadable files are the user's too here
        _fail(prog, str(error))
    try:
        return int(args.handler(args) or 0)
    except _user_errors() as error:
        _fail(prog, str(error))
    except KeyboardInterrupt:
        sys.stderr.write(f"{prog}: interrupted\n")
        return 130


if __name__ == "__main__":
    sys.exit(main())
