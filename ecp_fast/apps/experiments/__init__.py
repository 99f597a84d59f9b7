"""Experiments run by ``ecp-fast experiment <name>``, discovered at start-up.

Every module in this package (``pkgutil.iter_modules``) whose name does not start with an
underscore is an experiment, and exposes:

* ``NAME: str`` - the subcommand name (``ecp-fast experiment NAME ...``);
* ``HELP: str`` - one line for ``--help``;
* ``add_arguments(parser: argparse.ArgumentParser) -> None`` - its own options;
* ``run(args: argparse.Namespace) -> int`` - the exit status.

Adding a module here is all it takes; ``ecp_fast/cli.py`` is not edited. A module that fails to
import is skipped with a warning, so one broken experiment does not take the command line down.
"""
