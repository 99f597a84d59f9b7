"""The package's shape: a small public API, light imports, no cycles, no application in the library."""

from __future__ import annotations

import ast
import pathlib
import subprocess
import sys

import ecp_fast

PACKAGE = pathlib.Path(ecp_fast.__file__).resolve().parent
ROOT = PACKAGE.parent

BLOCKER = """
import importlib.abc, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in {'sklearn', 'matplotlib', 'scipy', 'transformers'}:
            raise ImportError(f'{name} is blocked: importing ecp_fast must not need it')
sys.meta_path.insert(0, Block())
import ecp_fast, ecp_fast.pruning, ecp_fast.training, ecp_fast.export, ecp_fast.distributed, ecp_fast.ops
print('ok')
"""


def test_import_needs_no_application_dependency() -> None:
    result = subprocess.run([sys.executable, "-c", BLOCKER], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().endswith("ok")


def _imports(path: pathlib.Path) -> set[str]:
    """Modules of ecp_fast imported by ``path``, at module level or inside functions (a lazy import
    is still a dependency). ``from package import submodule`` counts as an import of the submodule.
    """
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):  # imports for type checkers only are no dependency at run time
        if isinstance(node, ast.If) and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING":
            node.body = []
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("ecp_fast"):
            submodules = {f"{node.module}.{alias.name}" for alias in node.names}
            found = {name for name in submodules if (ROOT / (name.replace(".", "/") + ".py")).exists()}
            names.update(found if found else {node.module})
        elif isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names if alias.name.startswith("ecp_fast"))
    return names


def _module_name(path: pathlib.Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def test_the_library_never_imports_an_application() -> None:
    offenders = []
    for path in PACKAGE.rglob("*.py"):
        name = _module_name(path)
        if name.startswith("ecp_fast.apps") or name == "ecp_fast.__main__":  # the entry point of the CLI
            continue
        for imported in _imports(path):
            if imported.startswith("ecp_fast.apps"):
                offenders.append(f"{name} imports {imported}")
        source = path.read_text()
        if "ecp_fast.apps" in source and "import" in source.split("ecp_fast.apps")[0].rsplit("\n", 1)[-1]:
            offenders.append(f"{name} imports ecp_fast.apps lazily")
    assert not offenders, offenders


def test_no_module_level_import_cycle() -> None:
    modules = {_module_name(path): path for path in PACKAGE.rglob("*.py")}
    graph = {name: {m for m in _imports(path) if m in modules and m != name} for name, path in modules.items()}

    def reaches(start: str, goal: str, seen: set[str]) -> bool:
        for nxt in graph[start]:
            if nxt == goal:
                return True
            if nxt not in seen:
                seen.add(nxt)
                if reaches(nxt, goal, seen):
                    return True
        return False

    # A package's __init__ re-exports its submodules, which import siblings through the package:
    # only cycles between plain modules count.
    plain = [name for name, path in modules.items() if path.name != "__init__.py"]
    cycles = [
        name
        for name in plain
        if reaches(name, name, set()) and any(dep in plain and reaches(dep, name, set()) for dep in graph[name])
    ]
    assert not cycles, cycles


def test_every_public_name_is_documented() -> None:
    text = (ROOT / "README.md").read_text() + "".join(p.read_text() for p in (ROOT / "docs").glob("*.md"))
    missing = [name for name in ecp_fast.__all__ if name != "__version__" and name not in text]
    assert not missing, missing
