"""app: the Gradio front end (draw boxes on an image, get one mask per box).

It calls only ``serving``'s public API (``Segmenter``, ``Prediction``,
``serving.formats.visualize``,
``serving.errors``). :mod:`app.handlers` holds the request logic as plain functions,
:mod:`app.ui` the page and its API endpoints, :mod:`app.launch` the command line
(``python -m app --model PATH``). Gradio is imported only by ``app.ui`` and ``app.launch``.
"""

__all__ = ["main"]


def main(argv: list[str] | None = None) -> int:
    """Run ``python -m app`` with ``argv``; returns the exit code."""
    from .launch import main as _main

    return _main(argv)
