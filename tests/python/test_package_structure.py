"""The structure of the ``torch_ext`` package: no import cycle among its modules,
``torch_ext.patch`` imported only when wanted, and every public name an ``__all__`` lists
reachable.

The import graph is read from the source files with ``ast``, not from a running interpreter:
an edge ``a -> b`` is an import of ``b`` that runs when ``a`` is imported (module level, class
bodies and ``if`` / ``try`` / ``with`` blocks; not function bodies, nor ``if TYPE_CHECKING:``).
"""

from __future__ import annotations

import ast
import importlib
import os
import subprocess
import sys
import textwrap
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path

import pytest

import torch_ext

PACKAGE_DIR = Path(torch_ext.__file__).resolve().parent


# ---------------------------------------------------------------- the import graph


def module_files(package_dir: Path) -> dict[str, Path]:
    """Dotted name -> source file of every module of the package at ``package_dir`` (itself
    included, as its ``__init__.py``); folders without an ``__init__.py`` are not packages."""
    root = package_dir.parent
    modules: dict[str, Path] = {}
    for path in sorted(package_dir.rglob("*.py")):
        folders = path.relative_to(package_dir).parents
        if not all((package_dir / folder / "__init__.py").is_file() for folder in folders):
            continue
        parts = path.relative_to(root).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        modules[".".join(parts)] = path
    return modules


def _is_type_checking(test: ast.expr) -> bool:
    """Whether an ``if`` tests ``TYPE_CHECKING`` (or ``typing.TYPE_CHECKING``)."""
    if isinstance(test, ast.Name):
        return test.id == "TYPE_CHECKING"
    return isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"


def executed_imports(nodes: Iterable[ast.AST]) -> Iterator[ast.Import | ast.ImportFrom]:
    """The import statements among ``nodes`` (and inside them) that run when the module they
    belong to is imported: not those in function bodies, nor under ``if TYPE_CHECKING:``."""
    for node in nodes:
        if isinstance(node, ast.Import | ast.ImportFrom):
            yield node
        elif isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda):
            continue  # runs when called
        elif isinstance(node, ast.If) and _is_type_checking(node.test):
            yield from executed_imports(node.orelse)
        else:
            yield from executed_imports(ast.iter_child_nodes(node))


def imported_modules(
    statement: ast.Import | ast.ImportFrom, importer: str, is_package: bool, modules: set[str]
) -> set[str]:
    """The names in the package of ``importer`` that ``statement`` in ``importer`` imports.

    ``import a.b`` names ``a.b``; ``from a import b`` names the module ``a.b`` when ``modules``
    has it, else ``a`` (``b`` is then an attribute of ``a``). Relative imports are resolved
    against ``importer`` (a package's ``__init__`` is relative to the package itself). The
    parent packages that Python runs before a submodule are left out: every package imports
    its own submodules, so counting them would make each a cycle. A name in the package that
    is none of ``modules`` is returned as it is (the caller reports it).
    """
    root = importer.split(".")[0]

    def inside(name: str) -> bool:
        return name == root or name.startswith(root + ".")

    if isinstance(statement, ast.Import):
        return {alias.name for alias in statement.names if inside(alias.name)}
    if statement.level:
        parts = importer.split(".") if is_package else importer.split(".")[:-1]
        parts = parts[: len(parts) - (statement.level - 1)]
        base = ".".join([*parts, *([statement.module] if statement.module else [])])
    else:
        base = statement.module or ""
    if not inside(base):
        return set()
    names = {f"{base}.{alias.name}" for alias in statement.names}
    return {name if name in modules else base for name in names}


def import_graph(package_dir: Path) -> tuple[dict[str, set[str]], list[str]]:
    """``(graph, unresolved)``: module -> the package's modules it imports on being imported,
    and a line for every import of a name in the package that is none of its modules."""
    files = module_files(package_dir)
    modules = set(files)
    graph: dict[str, set[str]] = {}
    unresolved: list[str] = []
    for name, path in files.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        is_package = path.name == "__init__.py"
        graph[name] = set()
        for statement in executed_imports(tree.body):
            for target in sorted(imported_modules(statement, name, is_package, modules)):
                if target in modules:
                    graph[name].add(target)
                else:
                    unresolved.append(f"{name} (line {statement.lineno}) imports {target}")
    return graph, unresolved


def find_cycle(graph: Mapping[str, Iterable[str]]) -> list[str] | None:
    """One cycle of ``graph`` as ``[a, b, ..., a]`` (each node imports the next), or None.

    A depth-first search in sorted order (the same cycle on every run); an edge back to a node
    on the current path closes a cycle.
    """
    done: set[str] = set()
    path: list[str] = []
    on_path: set[str] = set()

    def visit(node: str) -> list[str] | None:
        path.append(node)
        on_path.add(node)
        for target in sorted(graph.get(node, ())):
            if target in on_path:
                return path[path.index(target) :] + [target]
            if target not in done:
                cycle = visit(target)
                if cycle is not None:
                    return cycle
        path.pop()
        on_path.discard(node)
        done.add(node)
        return None

    for start in sorted(graph):
        if start not in done:
            cycle = visit(start)
            if cycle is not None:
                return cycle
    return None


# ---------------------------------------------------------------- the cycle finder itself


def test_find_cycle_reports_a_cycle():
    graph = {"a": ["b"], "b": ["c"], "c": ["a", "d"], "d": [], "e": ["a"]}
    assert find_cycle(graph) == ["a", "b", "c", "a"]


def test_find_cycle_reports_a_self_import():
    assert find_cycle({"a": ["b"], "b": ["b"]}) == ["b", "b"]


def test_find_cycle_accepts_a_diamond():
    graph = {"top": ["left", "right"], "left": ["bottom"], "right": ["bottom"], "bottom": []}
    assert find_cycle(graph) is None
    assert find_cycle({}) is None


def _write_package(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))
    return root / next(iter(files)).split("/")[0]


def test_import_graph_of_a_package_with_a_cycle(tmp_path):
    """The graph of a small package on disk: absolute and relative imports, ``from pkg import
    submodule``, and the imports that do not run on import (in a function, under
    TYPE_CHECKING), which make no edge."""
    package = _write_package(
        tmp_path,
        {
            "pkg/__init__.py": "from pkg import a\nfrom . import sub\n",
            "pkg/a.py": "import os\nfrom pkg.b import thing\n",
            "pkg/b.py": """\
                from typing import TYPE_CHECKING
                from .sub import helpers
                if TYPE_CHECKING:
                    from pkg import a  # no edge
                try:
                    from pkg.sub.helpers import x
                except ImportError:
                    pass
                def later():
                    import pkg.a  # no edge
                thing = 1
                """,
            "pkg/sub/__init__.py": "from ..sub import helpers\n",
            "pkg/sub/helpers.py": "from .. import b\n",  # closes pkg.b -> helpers -> pkg.b
            "pkg/data/not_a_package.py": "import pkg\n",
        },
    )
    graph, unresolved = import_graph(package)
    assert graph == {
        "pkg": {"pkg.a", "pkg.sub"},
        "pkg.a": {"pkg.b"},
        "pkg.b": {"pkg.sub.helpers"},
        "pkg.sub": {"pkg.sub.helpers"},
        "pkg.sub.helpers": {"pkg.b"},
    }
    assert unresolved == []
    assert find_cycle(graph) == ["pkg.b", "pkg.sub.helpers", "pkg.b"]


def test_import_graph_reports_an_import_it_can_not_resolve(tmp_path):
    package = _write_package(
        tmp_path, {"pkg/__init__.py": "", "pkg/a.py": "import pkg.gone\nfrom pkg import b\n"}
    )
    graph, unresolved = import_graph(package)
    assert graph == {"pkg": set(), "pkg.a": {"pkg"}}  # b: an attribute of pkg
    assert unresolved == ["pkg.a (line 1) imports pkg.gone"]


# ---------------------------------------------------------------- torch_ext's own graph


def test_torch_ext_has_no_import_cycle():
    graph, unresolved = import_graph(PACKAGE_DIR)
    assert not unresolved, "imports of modules that do not exist:\n" + "\n".join(unresolved)
    assert {"torch_ext", "torch_ext.varlen", "torch_ext.patch.rmpad"} <= set(graph)
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_torch_ext_does_not_import_patch_on_import():
    graph, _ = import_graph(PACKAGE_DIR)
    assert "torch_ext.varlen" in graph["torch_ext"]
    assert not any(target.startswith("torch_ext.patch") for target in graph["torch_ext"])


# ---------------------------------------------------------------- torch_ext.patch is lazy

_LAZY_PATCH = """
import sys

import torch_ext

loaded = [m for m in sys.modules if m == "torch_ext.patch" or m.startswith("torch_ext.patch.")]
assert not loaded, f"import torch_ext imported {sorted(loaded)}"
assert "patch" in torch_ext.__all__ and "patch" in dir(torch_ext)
apply_rmpad = torch_ext.patch.apply_rmpad  # the first access imports it
import torch_ext.patch
from torch_ext import patch
from torch_ext.patch import apply_rmpad as again
assert sys.modules["torch_ext.patch"] is torch_ext.patch is patch
assert apply_rmpad is again is sys.modules["torch_ext.patch.rmpad"].apply_rmpad
print("ok")
"""


def _python(code: str) -> subprocess.CompletedProcess:
    """``code`` run by this interpreter in a fresh process that imports this very torch_ext."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        [str(PACKAGE_DIR.parent), *filter(None, [env.get("PYTHONPATH")])]
    )
    return subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300
    )


def test_import_torch_ext_leaves_patch_unimported():
    result = _python(_LAZY_PATCH)
    assert result.returncode == 0, f"{result.stdout}\n{result.stderr}"
    assert result.stdout.strip().endswith("ok")


def test_import_torch_ext_patch_first():
    result = _python("import torch_ext.patch, torch_ext\nprint(torch_ext.patch.apply_rmpad)")
    assert result.returncode == 0, f"{result.stdout}\n{result.stderr}"


def test_unknown_attribute_is_an_attribute_error():
    with pytest.raises(AttributeError, match="no_such_name"):
        torch_ext.no_such_name  # noqa: B018
    assert not hasattr(torch_ext, "no_such_name")


# ---------------------------------------------------------------- public names

PUBLIC_MODULES = sorted(
    name
    for name in module_files(PACKAGE_DIR)
    if not any(part.startswith("_") for part in name.split("."))
)


@pytest.mark.parametrize("name", PUBLIC_MODULES)
def test_public_names_resolve(name):
    """Every name in a public module's ``__all__`` (where it has one) is an attribute of it."""
    module = importlib.import_module(name)
    names = getattr(module, "__all__", [])
    assert all(isinstance(entry, str) for entry in names), names
    missing = [entry for entry in names if not hasattr(module, entry)]
    assert not missing, f"{name}.__all__ lists names it does not have: {missing}"


# Import paths used outside the package's own modules (README, benchmarks, tests) that no
# __all__ lists, or that name a module the package has split.
PATHS = [
    "torch_ext.conv.conv_route",
    "torch_ext.nn.conv.ASPP",
    "torch_ext.nn.conv.ASPPPooling",
    "torch_ext.nn.conv.DilatedConv2d",
    "torch_ext.nn.conv.check_gridding",
    "torch_ext.nn.conv.receptive_field",
    "torch_ext.metrics.SegmentationMetrics",
    "torch_ext._segmentation_stream.SegmentationMetrics",
    "torch_ext.patch.apply_rmpad",
    "torch_ext.patch.rmpad.apply_rmpad",
    "torch_ext.varlen.PackingCollator",
    "torch_ext.varlen.attention",
    "torch_ext.varlen.unpad_input",
]


@pytest.mark.parametrize("path", PATHS)
def test_import_path(path):
    module, name = path.rsplit(".", 1)
    assert hasattr(importlib.import_module(module), name)


def test_split_modules_share_their_objects():
    from torch_ext import _segmentation_stream, metrics, nn, varlen

    assert metrics.SegmentationMetrics is _segmentation_stream.SegmentationMetrics
    assert nn.ASPP is nn.conv.ASPP and nn.receptive_field is nn.conv.receptive_field
    assert torch_ext.unpad_input is varlen.unpad_input
    assert torch_ext.plan_packing is varlen.plan_packing
