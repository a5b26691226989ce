"""The shared tiny-model helpers of ``tests/conftest.py``, importable from any test module.

``from conftest import ...`` is not reliable in a full ``pytest tests`` run: pytest swaps the
module named ``conftest`` as it collects sub-folders that have their own conftest.py (app/,
export/, training/). This module loads the root conftest by path under a unique name instead.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

_NAME = "_tests_root_conftest"
if _NAME not in sys.modules:
    _spec = importlib.util.spec_from_file_location(
        _NAME, Path(__file__).resolve().parents[1] / "conftest.py")
    assert _spec is not None and _spec.loader is not None
    _module = importlib.util.module_from_spec(_spec)
    sys.modules[_NAME] = _module
    _spec.loader.exec_module(_module)
_root = sys.modules[_NAME]

TINY_CLASSES = _root.TINY_CLASSES
tiny_model_config = _root.tiny_model_config
make_tiny_checkpoint = _root.make_tiny_checkpoint

__all__ = ["TINY_CLASSES", "make_tiny_checkpoint", "tiny_model_config"]
