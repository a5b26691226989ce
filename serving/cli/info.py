"""``python -m serving info MODEL``: print what a model file says about itself."""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence

from ..segmenter import Segmenter


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m serving info", description=__doc__)
    parser.add_argument("model", help="checkpoint (.safetensors), .onnx or TensorRT engine")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    seg = Segmenter.load(args.model, device=args.device)
    print(json.dumps(seg.model_info, indent=2))
    return 0
