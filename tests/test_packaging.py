"""Packaging facts checked without installing anything: every third-party import of the product
is declared (core or an extra), declared floors cover the APIs the code uses, the licence is an
SPDX string (no setuptools deprecation warning), and the extras table in docs matches."""

from __future__ import annotations

import ast
import re
import sys
from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parents[1]
PROJECT = ("serving", "training", "export", "app", "sim_cli")
#: import name -> distribution name, where they differ.
DIST = {"PIL": "pillow", "yaml": "pyyaml", "skimage": "scikit-image",
        "starlette": "fastapi"}  # starlette is FastAPI's own dependency, pinned by it
#: imports guarded by a fallback or a one-line error naming the package to install.
OPTIONAL = {"tifffile": "training/data/nuclei.py falls back to Pillow"}
#: APIs whose first release is newer than a plain import suggests: (package, minimum).
API_FLOORS = {"torch.accelerator": ("torch", (2, 6)),
              "torch.library.custom_op": ("torch", (2, 4)),
              "model_dump": ("pydantic", (2, 0)),
              "gr.Blocks": ("gradio", (6, 0))}


def _pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def _requirements() -> dict[str, tuple[int, ...] | None]:
    """Declared distribution -> its floor (``>=x.y``) over the core and every extra."""
    project = _pyproject()["project"]
    specs = list(project["dependencies"])
    for extra in project["optional-dependencies"].values():
        specs += extra
    out: dict[str, tuple[int, ...] | None] = {}
    for spec in specs:
        match = re.match(r"([A-Za-z0-9_.\-]+)(\[[^\]]*\])?\s*(?:>=\s*([0-9.]+))?", spec)
        assert match, spec
        name = match.group(1).lower().replace("_", "-")
        floor = tuple(int(x) for x in match.group(3).split(".")) if match.group(3) else None
        out[name] = floor
    return out


def _third_party_imports() -> set[str]:
    names: set[str] = set()
    for package in PROJECT:
        for path in (ROOT / package).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                if isinstance(node, ast.Import):
                    names |= {a.name.split(".")[0] for a in node.names}
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    names.add(node.module.split(".")[0])
    return {n for n in names if n not in sys.stdlib_module_names and n not in PROJECT}


def test_every_third_party_import_is_declared():
    declared = _requirements()
    missing = [name for name in sorted(_third_party_imports()) if name not in OPTIONAL
               and DIST.get(name, name).lower().replace("_", "-") not in declared]
    assert not missing, f"imported but not declared in pyproject.toml: {missing}"


def test_floors_cover_the_apis_the_code_uses():
    declared = _requirements()
    source = "\n".join(p.read_text(encoding="utf-8") for package in PROJECT
                       for p in (ROOT / package).rglob("*.py"))
    for api, (dist, minimum) in API_FLOORS.items():
        if api in source:
            floor = declared.get(dist)
            assert floor is not None and floor >= minimum, (
                f"{api} needs {dist}>={'.'.join(map(str, minimum))}; pyproject declares "
                f"{floor}")


def test_extras_and_licence_are_what_the_docs_promise():
    project = _pyproject()["project"]
    assert isinstance(project["license"], str)  # a table is deprecated by setuptools >= 77
    assert project["scripts"]["sim"] == "sim_cli.main:main"
    extras = set(project["optional-dependencies"])
    assert {"train", "export", "gpu", "app", "serve", "all", "dev"} <= extras
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    for extra in ("train", "export", "gpu", "app", "serve", "all", "dev"):
        assert f"`{extra}`" in readme, f"README's extras table lacks {extra}"
