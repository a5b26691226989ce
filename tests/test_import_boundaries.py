"""The dependency direction of DESIGN.md section 2, enforced on the source (AST) and at runtime.

- ``serving`` never imports ``training``, ``export``, ``app`` or ``gradio``, and imports
  ``accelerate`` only inside functions of ``serving.cli.shards`` (multi-process batch runs);
  it imports ``pycocotools``, ``onnxruntime``, ``tensorrt``, ``fastapi`` and ``uvicorn`` only
  inside functions, or at module level in the lazily loaded backend / server modules, which
  no other ``serving`` module imports at module level.
- ``training`` never imports ``export`` or ``app``; ``export`` never imports ``training`` or
  ``app``; ``app`` uses only ``serving`` from the project.
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
HEAVY = ("pycocotools", "onnxruntime", "tensorrt", "fastapi", "uvicorn")
NEVER_IN_SERVING = ("training", "export", "app", "gradio")
#: The one serving module that may import accelerate, and only inside its functions.
ACCELERATE_MODULE = "serving.cli.shards"
#: serving modules allowed to import HEAVY at module level (they are loaded lazily).
LAZY_PATTERNS = ("serving.backends.onnxruntime_backend", "serving.backends.tensorrt_backend",
                 "serving.server.app*", "serving.server.labelstudio")


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
    assert found, "serving.cli.shards is expected to use accelerate for multi-process runs"
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
