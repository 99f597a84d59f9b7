"""The shape of the library's code: no function over 60 lines, none with more than 8 positional parameters.

Length counts from the ``def`` line to the end of the body, docstring included (decorators not).
Positional parameters are the positional-only and positional-or-keyword ones, ``self`` and ``cls``
included; keyword-only parameters (after ``*``) do not count. The Triton kernels are exempt: a
kernel's parameters are its pointers, strides and compile-time constants.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "ecp_fast"
MAX_LINES = 60
MAX_POSITIONAL = 8

#: Files of Triton kernels (``@triton.jit`` is applied when they are built).
KERNEL_FILES = {"ops/triton/kernels.py"}


def _functions(tree: ast.AST, prefix: str = ""):
    """``(qualified name, node)`` of every function and method, nested ones included."""
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            name = prefix + node.name
            yield name, node
            yield from _functions(node, name + ".")
        elif isinstance(node, ast.ClassDef):
            yield from _functions(node, prefix + node.name + ".")
        else:
            yield from _functions(node, prefix)


def measure() -> dict[tuple[str, str], tuple[int, int]]:
    """``(file, qualified name) -> (lines, positional parameters)`` of every function of the package."""
    sizes: dict[tuple[str, str], tuple[int, int]] = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        relative = path.relative_to(PACKAGE).as_posix()
        if relative in KERNEL_FILES:
            continue
        for name, node in _functions(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
            assert node.end_lineno is not None
            lines = node.end_lineno - node.lineno + 1
            positional = len(node.args.posonlyargs) + len(node.args.args)
            sizes[(relative, name)] = (lines, positional)
    return sizes


SIZES = measure()


def test_the_package_is_measured() -> None:
    assert len(SIZES) > 300
    assert ("pruning/calibration.py", "Calibrator.run") in SIZES
    assert ("pruning/calibration.py", "_PassHooks.hook.forward_hook") in SIZES


def test_no_function_is_longer_than_60_lines() -> None:
    too_long = {
        f"ecp_fast/{path}: {name} has {lines} lines" for (path, name), (lines, _) in SIZES.items() if lines > MAX_LINES
    }
    assert not too_long, f"functions over {MAX_LINES} lines (split them): {sorted(too_long)}"


def test_no_function_has_more_than_8_positional_parameters() -> None:
    too_many = {
        f"ecp_fast/{path}: {name} takes {positional} positional parameters"
        for (path, name), (_, positional) in SIZES.items()
        if positional > MAX_POSITIONAL
    }
    assert not too_many, f"make the parameters after the {MAX_POSITIONAL}th keyword-only: {sorted(too_many)}"
