"""The dependency direction of DESIGN.md section 2, enforced on the source (AST) and at runtime.

- ``serving`` never imports ``training``, ``export``, ``app`` or ``gradio``, and imports
  ``accelerate`` only inside functions of ``serving.sharding.shards`` (multi-process batch runs);
  it imports ``pycocotools``, ``onnxruntime``, ``tensorrt``, ``fastapi`` and ``uvicorn`` only
  inside functions, or at module level in the lazily loaded backend / server modules, which
  no other ``serving`` module imports at module level.
- ``training`` never imports ``export`` or ``app``; ``export`` never imports ``training`` or
  ``app``; ``app`` uses only ``serving`` from the project.
- The front door ``sim_cli`` (the ``sim`` command) sits above all four: it imports every
  command's module inside a function, and nothing in the four packages imports it.
- No module imports a project module by a name string, no two modules share a file name, and
  no project modules import each other in a circle (lazy and ``TYPE_CHECKING`` imports
  included).
"""

from __future__ import annotations

import ast
import fnmatch
import functools
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PROJECT = ("serving", "training", "export", "app")
#: The package of the ``sim`` command, above the four.
FRONT_DOOR = "sim_cli"
#: The modules whose ``main`` the front door runs for the commands above the library.
FRONT_DOOR_COMMANDS = ("training.train", "training.evaluate", "training.quickstart",
                       "export.__main__", "app.launch")
HEAVY = ("pycocotools", "onnxruntime", "tensorrt", "fastapi", "uvicorn")
NEVER_IN_SERVING = ("training", "export", "app", "gradio")
#: The one serving module that may import accelerate, and only inside its functions.
ACCELERATE_MODULE = "serving.sharding.shards"
#: serving modules allowed to import HEAVY at module level (they are loaded lazily).
LAZY_PATTERNS = ("serving.backends.onnxruntime_backend", "serving.backends.tensorrt_backend",
                 "serving.server.app*", "serving.server.labelstudio_backend")


@dataclass(frozen=True)
class Imp:
    module: str      # the importing module, dotted
    targets: tuple   # dotted names it may load (a package and, for ``from``, its submodules)
    lazy: bool       # inside a function (or TYPE_CHECKING): not executed on import
    line: int


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _resolve(path: Path, module: str | None, level: int) -> str:
    if level == 0:
        return module or ""
    package = module_name(path).split(".")
    if path.name != "__init__.py":
        package = package[:-1]
    base = package[: len(package) - (level - 1)]
    return ".".join(base + ([module] if module else []))


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def collect_imports(path: Path) -> list[Imp]:
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    name = module_name(path)
    found: list[Imp] = []

    def visit(node: ast.AST, lazy: bool) -> None:
        if isinstance(node, ast.Import):
            for alias in node.names:
                found.append(Imp(name, (alias.name,), lazy, node.lineno))
        elif isinstance(node, ast.ImportFrom):
            base = _resolve(path, node.module, node.level)
            targets = (base, *(f"{base}.{a.name}" for a in node.names if a.name != "*"))
            found.append(Imp(name, targets, lazy, node.lineno))
        elif isinstance(node, ast.Call):
            func = node.func
            fname = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            if fname in ("import_module", "__import__") and node.args and isinstance(
                    node.args[0], ast.Constant) and isinstance(node.args[0].value, str):
                found.append(Imp(name, (node.args[0].value,), lazy, node.lineno))
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            lazy = True
        if isinstance(node, ast.If) and _is_type_checking(node):
            for child in node.body:
                visit(child, True)
            for child in node.orelse:
                visit(child, lazy)
            return
        for child in ast.iter_child_nodes(node):
            visit(child, lazy)

    visit(tree, False)
    return found


def top(dotted: str) -> str:
    return dotted.split(".")[0]


def files_of(package: str) -> list[Path]:
    folder = ROOT / package
    return sorted(folder.rglob("*.py")) if folder.is_dir() else []


@functools.cache
def imports_of(package: str) -> tuple[Imp, ...]:
    return tuple(imp for path in files_of(package) for imp in collect_imports(path))


def is_lazy_module(dotted: str) -> bool:
    return any(fnmatch.fnmatch(dotted, pattern) for pattern in LAZY_PATTERNS)


def fmt(imp: Imp) -> str:
    return f"{imp.module}:{imp.line} imports {imp.targets[0]}"


# ------------------------------------------------------------------ the scanner itself
def test_scanner_classifies_a_sample(tmp_path, monkeypatch):
    pkg = tmp_path / "serving" / "sub"
    pkg.mkdir(parents=True)
    (tmp_path / "serving" / "__init__.py").write_text("")
    (pkg / "__init__.py").write_text("")
    src = pkg / "mod.py"
    src.write_text(
        "import numpy as np\n"
        "from typing import TYPE_CHECKING\n"
        "from ..backends import onnxruntime_backend\n"
        "from . import other\n"
        "if TYPE_CHECKING:\n"
        "    import onnxruntime\n"
        "class A:\n"
        "    import pycocotools\n"
        "def f():\n"
        "    import fastapi\n"
        "    importlib.import_module('gradio')\n"
    )
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    got = {(imp.targets, imp.lazy) for imp in collect_imports(src)}
    assert (("numpy",), False) in got
    assert (("serving.backends", "serving.backends.onnxruntime_backend"), False) in got
    assert (("serving.sub", "serving.sub.other"), False) in got
    assert (("onnxruntime",), True) in got
    assert (("pycocotools",), False) in got  # class bodies run at import
    assert (("fastapi",), True) in got and (("gradio",), True) in got


# ------------------------------------------------------------------ the rules
def test_serving_exists_and_is_scanned():
    assert len(files_of("serving")) >= 10
    assert any(imp.targets[0] == "torch" for imp in imports_of("serving"))


def test_serving_never_imports_training_export_app_gradio():
    bad = [fmt(imp) for imp in imports_of("serving")
           if any(top(t) in NEVER_IN_SERVING for t in imp.targets)]
    assert not bad, bad


def test_serving_imports_accelerate_only_lazily_for_multi_process_runs():
    found = [imp for imp in imports_of("serving")
             if any(top(t) == "accelerate" for t in imp.targets)]
    assert found, "serving.sharding.shards is expected to use accelerate for multi-process runs"
    bad = [fmt(imp) for imp in found if imp.module != ACCELERATE_MODULE or not imp.lazy]
    assert not bad, bad


def test_serving_imports_heavy_packages_only_lazily():
    bad = [fmt(imp) for imp in imports_of("serving")
           if not imp.lazy and not is_lazy_module(imp.module)
           and any(top(t) in HEAVY for t in imp.targets)]
    assert not bad, bad


def test_lazy_serving_modules_are_never_imported_at_module_level():
    bad = [fmt(imp) for imp in imports_of("serving")
           if not imp.lazy and not is_lazy_module(imp.module)
           and any(is_lazy_module(t) for t in imp.targets)]
    assert not bad, bad


@pytest.mark.parametrize("package, forbidden", [
    ("training", ("export", "app")),
    ("export", ("training", "app")),
    ("app", ("training", "export")),
])
def test_other_packages_respect_the_direction(package, forbidden):
    imports = imports_of(package)
    if not files_of(package):
        pytest.skip(f"{package}/ has no Python files yet")
    bad = [fmt(imp) for imp in imports if any(top(t) in forbidden for t in imp.targets)]
    assert not bad, bad


# ------------------------------------------------------------------ at runtime
@pytest.mark.slow
def test_import_serving_without_optional_or_project_packages():
    """The brief's check (accelerate, gradio, pycocotools, onnxruntime set to None in
    sys.modules, then ``import serving; from serving import Segmenter``), extended to every
    heavy and project package and to every eagerly loadable serving module."""
    blocked = ("accelerate", "gradio", "pycocotools", "onnxruntime", *HEAVY, *NEVER_IN_SERVING)
    code = (
        "import sys, pkgutil, fnmatch, importlib\n"
        f"[sys.modules.__setitem__(m, None) for m in {tuple(dict.fromkeys(blocked))!r}]\n"
        "import serving\n"
        "from serving import Segmenter\n"
        f"lazy = {LAZY_PATTERNS!r}\n"
        "names = [i.name for i in pkgutil.walk_packages(serving.__path__, 'serving.')]\n"
        "for n in names:\n"
        "    if not any(fnmatch.fnmatch(n, p) for p in lazy):\n"
        "        importlib.import_module(n)\n"
        "print(len(names))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert int(proc.stdout.strip().splitlines()[-1]) >= 10


# ------------------------------------------------------------------ the front door
def test_front_door_imports_every_command_visibly_and_lazily():
    imports = imports_of(FRONT_DOOR)
    assert imports, "sim_cli/ is expected to hold the sim command"
    lazy = {t for imp in imports if imp.lazy for t in imp.targets}
    missing = [m for m in FRONT_DOOR_COMMANDS if m not in lazy]
    assert not missing, f"the command table does not import {missing}"
    eager = [fmt(imp) for imp in imports if not imp.lazy
             and any(top(t) in ("training", "export", "app") for t in imp.targets)]
    assert not eager, eager  # `sim predict` must not load training, export or the app


@pytest.mark.parametrize("package", PROJECT)
def test_nothing_below_imports_the_front_door(package):
    bad = [fmt(imp) for imp in imports_of(package)
           if any(top(t) == FRONT_DOOR for t in imp.targets)]
    assert not bad, bad


def test_no_project_module_is_imported_by_a_name_string():
    calls = []
    for package in (*PROJECT, FRONT_DOOR):
        for path in files_of(package):
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                func = getattr(node, "func", None)
                name = getattr(func, "attr", None) or getattr(func, "id", None)
                if isinstance(node, ast.Call) and name in ("import_module", "__import__"):
                    calls.append(f"{module_name(path)}:{node.lineno}")
    assert not calls, calls


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One circle of ``graph`` (module -> modules it imports) as a path, or ``None``."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        state[node] = 2
        path.pop()
        return None

    for start in sorted(graph):
        if start not in state and (found := visit(start)):
            return found
    return None


def test_find_cycle_finds_a_planted_circle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]


def test_no_import_circles_between_project_modules():
    modules = {module_name(path): path for package in (*PROJECT, FRONT_DOOR)
               for path in files_of(package)}
    graph = {name: {t for imp in collect_imports(path) for t in imp.targets
                    if t in modules and t != name}
             for name, path in modules.items()}
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph) or [])


def test_no_two_modules_share_a_file_name():
    """docs/CONVENTIONS.md's naming rule: one meaning per name (``__init__``/``__main__``
    aside)."""
    seen: dict[str, list[str]] = {}
    for package in (*PROJECT, FRONT_DOOR):
        for path in files_of(package):
            if path.stem not in ("__init__", "__main__"):
                seen.setdefault(path.name, []).append(module_name(path))
    shared = {name: where for name, where in seen.items() if len(where) > 1}
    assert not shared, shared
