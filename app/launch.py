"""``python -m app``: serve the Gradio page for a model file.

    python -m app --model runs/quickstart/model_final.safetensors --port 7860

Any model ``serving.Segmenter.load`` accepts works (``.safetensors`` PyTorch checkpoint,
``.onnx``, TensorRT ``.engine``). Requests are queued and at most ``--concurrency`` run at
once; uploads over ``--max-upload-mb`` and images over ``--max-side`` pixels are refused with
a message on the page.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Any

from serving.backends.locate import MODEL_HELP
from serving.cli.common import add_box_scale_option, add_image_size_option
from serving.errors import SimError
from serving.prompts import DEFAULT_MAX_REQUEST_BOXES


def parse_args(argv: list[str] | None = None, prog: str = "python -m app") -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog=prog, description="Serve the Gradio page (draw boxes, get masks).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        epilog="examples: sim app --model runs/quickstart/model_final.safetensors; "
               "sim app --model model.onnx --host 0.0.0.0 --port 7860")
    p.add_argument("--model", required=True,
                   help=MODEL_HELP)
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (0.0.0.0 for every interface)")
    p.add_argument("--port", type=int, default=7860, help="port to listen on")
    p.add_argument("--share", choices=("on", "off"), default="off",
                   help="'on' asks Gradio for a public *.gradio.live link (needs internet)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--dtype", default="fp32", choices=("fp32", "bf16", "fp16"),
                   help="checkpoints: bf16 (CPUs with AVX512_BF16/AMX, GPUs) or fp16 (GPUs)")
    p.add_argument("--max-upload-mb", type=float, default=20.0,
                   help="largest accepted upload in megabytes")
    p.add_argument("--max-side", type=int, default=4096,
                   help="largest accepted image width or height in pixels")
    p.add_argument("--max-boxes", type=int, default=DEFAULT_MAX_REQUEST_BOXES,
                   help="most prompt boxes one request may hold; more than the model's "
                        "max_prompt_boxes run in several forward passes")
    add_image_size_option(p)
    add_box_scale_option(p)
    p.add_argument("--concurrency", type=int, default=2,
                   help="requests that run at the same time; the rest wait in the queue")
    p.add_argument("--queue-size", type=int, default=64,
                   help="most requests waiting in the queue; more are refused")
    p.add_argument("--output-dir", default=None,
                   help="folder for result files (default: a temporary folder)")
    args = p.parse_args(argv)
    for name in ("port", "max_side", "concurrency", "queue_size"):
        if getattr(args, name) < (0 if name == "port" else 1):
            p.error(f"--{name.replace('_', '-')} must be positive")
    if args.max_upload_mb <= 0:
        p.error("--max-upload-mb must be positive")
    if args.max_boxes is not None and args.max_boxes < 1:
        p.error("--max-boxes must be at least 1")
    return args


def create_app(args: argparse.Namespace) -> Any:
    """Load the model and build the queued ``gr.Blocks`` (not launched yet).

    Raises:
        SimError: the model file is missing, corrupt or of an unknown type.
    """
    from serving import Segmenter

    from .handlers import Handlers
    from .ui import build_app

    segmenter = Segmenter.load(args.model, device=args.device, image_size=args.image_size,
                               dtype=args.dtype)
    if args.box_scale == "off":
        segmenter = segmenter.with_box_scale(False)
    handlers = Handlers(segmenter, max_side=args.max_side, output_dir=args.output_dir,
                        max_boxes=args.max_boxes)
    demo = build_app(handlers)
    demo.queue(default_concurrency_limit=args.concurrency, max_size=args.queue_size)
    return demo


def launch(demo: Any, args: argparse.Namespace, block: bool = True) -> Any:
    """Start the server (``block=False`` returns at once, for tests and scripts)."""
    from .ui import theme

    return demo.launch(server_name=args.host, server_port=args.port, share=args.share == "on",
                       max_file_size=int(args.max_upload_mb * 1024 * 1024), ssr_mode=False,
                       prevent_thread_lock=not block, show_error=False, theme=theme(),
                       footer_links=["api"], quiet=False)


def main(argv: list[str] | None = None, prog: str = "python -m app") -> int:
    """Entry point (``prog``: the name ``--help`` shows); returns the process exit code."""
    args = parse_args(argv, prog)
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    try:
        demo = create_app(args)
    except SimError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    launch(demo, args)
    return 0
