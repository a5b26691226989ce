"""The Gradio page and its named API endpoints, over :class:`app.handlers.Handlers`.

Box drawing uses the ``gradio_image_annotation`` custom component (``image_annotator``): it
is maintained, installs from PyPI, its 0.5 series is built for Gradio 6 (``gradio>=6.14,<7``),
and it lets a person draw, move, resize and delete boxes and give each a label from a list.
Gradio 6's own components do not fit: ``gr.ImageEditor`` paints strokes (no boxes to read
back) and ``gr.AnnotatedImage`` only displays. Each box's label is ``auto`` (the model picks
the class) or one of the model's classes; double-click a box (or select it and press E) to
change it.

Endpoints (``api_name``): ``/segment_json`` (image file + JSON boxes, for programs),
``/segment`` (the page's annotator value) and ``/model_info``. See docs/app.md.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import gradio as gr
import numpy as np
from gradio_image_annotation import image_annotator

from serving.errors import SimError

from .handlers import AUTO_LABEL, TABLE_HEADERS, Handlers, read_upload

log = logging.getLogger("app")

EXAMPLES_DIR = Path(__file__).resolve().parent / "examples"
IMAGE_HEIGHT = 420  # px: the drawing canvas's largest height; larger images are scaled
INTRO = ("Upload an image (or pick an example), **draw a box** around each object and get its "
         "mask. Double-click a box to choose its class (`auto` lets the model decide); drag a "
         "box's corners to adjust it. Tick *Automatic mode* to find every instance instead.")
EmptyOutputs = tuple[None, list, None, None, str]


def load_examples(folder: Path = EXAMPLES_DIR) -> list[dict[str, Any]]:
    """The bundled examples as annotator values (``{"image": path, "boxes": [...]}``)."""
    index = folder / "examples.json"
    if not index.is_file():
        return []
    items = json.loads(index.read_text())
    return [{"image": str(folder / it["image"]), "boxes": it["boxes"]} for it in items
            if (folder / it["image"]).is_file()]


def _raw_upload(image: Any) -> str | None:
    """Replacement of the annotator's ``preprocess_image``: hand over the uploaded file's path.

    The component's own version decodes with PIL (opaque errors for corrupt files, 16-bit data
    clipped); ``serving.inference.images.load_image`` does it with clear one-line errors instead.
    """
    return None if image is None else str(image.path)


def _error(message: str) -> EmptyOutputs:
    gr.Warning(message)
    return None, [], None, None, f"**Error:** {message}"


def _being_drawn(boxes: list[dict] | None) -> bool:
    """True while a box is being drawn: the annotator then reports it with zero size (its
    change event fires at the press and again at the release)."""
    return any(b["xmax"] - b["xmin"] < 1 or b["ymax"] - b["ymin"] < 1 for b in boxes or [])


def make_page_handler(handlers: Handlers):
    """The page's callback: ``(annotator value, automatic, threshold) -> (overlay, rows, json
    file, png file, status Markdown)``. Bad input gives a warning and a message, not an
    exception, so the page (and the server) keep working; while a box is being drawn the
    outputs are left as they are."""

    def segment(annotation: dict | None, automatic: bool, threshold: float):
        image = (annotation or {}).get("image")
        if image is None:
            return None, [], None, None, "Upload an image or pick an example."
        boxes = annotation.get("boxes") or []
        if not automatic and _being_drawn(boxes):
            return tuple(gr.skip() for _ in range(5))  # wait for the release
        orientation = int(annotation.get("orientation") or 0)
        try:
            if not automatic and not boxes:
                arr = read_upload(image, handlers.max_side)
                if orientation % 4:
                    arr = np.rot90(arr, k=-(orientation % 4))
                return arr, [], None, None, "Draw a box around an object to segment it."
            res = handlers.segment(image, boxes, "automatic" if automatic else "boxes",
                                   threshold if automatic else None, Path(image).name,
                                   orientation)
        except SimError as exc:
            return _error(str(exc))
        except Exception:  # noqa: BLE001 - a bug must not take the page down
            log.exception("segmentation failed")
            return _error("internal error while segmenting; see the server log")
        done = f"**Done:** {res.message}"
        return res.overlay, res.rows, str(res.json_path), str(res.png_path), done

    return segment


def make_api_handler(handlers: Handlers):
    """The ``/segment_json`` callback: ``(image file, boxes JSON, mode, threshold) -> (overlay,
    COCO dict, instance PNG)``. Bad input raises ``gr.Error`` (clients get its message)."""

    def segment_json(image: str | None, boxes: str | None, mode: str = "boxes",
                     threshold: float | None = None):
        try:
            name = Path(image).name if image else "image.png"
            res = handlers.segment(image, boxes, mode, threshold, name)
        except SimError as exc:
            raise gr.Error(str(exc), print_exception=False) from None
        except Exception:  # noqa: BLE001
            log.exception("segmentation failed")
            raise gr.Error("internal error while segmenting; see the server log") from None
        return res.overlay, res.coco, str(res.png_path)

    return segment_json


def _draw_tab(handlers: Handlers, examples: list[dict[str, Any]]) -> None:
    """The "Draw boxes" tab: annotator and controls, overlay, table and downloads; runs on
    every change and on the button (API name ``segment``)."""
    classes = list(handlers.segmenter.class_names)
    page_fn = make_page_handler(handlers)
    with gr.Row():
        with gr.Column(scale=1):
            annotator = image_annotator(
                label="Image: draw boxes", label_list=[AUTO_LABEL, *classes],
                use_default_label=True, image_type="filepath", box_min_size=4,
                sources=["upload", "clipboard"], show_remove_button=True,
                height=IMAGE_HEIGHT, elem_id="annotator")
            annotator.preprocess_image = _raw_upload  # see _raw_upload
            automatic = gr.Checkbox(False, label="Automatic mode (ignore boxes, find every "
                                    "instance)", elem_id="automatic")
            threshold = gr.Slider(0.0, 1.0, handlers.default_threshold, step=0.01,
                                  label="Score threshold (automatic mode; the default is the "
                                        "model's calibrated one)")
            run = gr.Button("Run", variant="primary", elem_id="run")
        with gr.Column(scale=1):
            overlay = gr.Image(label="Masks", type="numpy", format="png", interactive=False,
                               elem_id="overlay")
            status = gr.Markdown("Upload an image or pick an example.", label="Status",
                                 elem_id="status")
            table = gr.Dataframe(headers=TABLE_HEADERS, label="Instances", interactive=False,
                                 elem_id="instances")
            with gr.Row():
                coco_file = gr.File(label="COCO JSON (RLE masks)", interactive=False)
                png_file = gr.File(label="Instance-id PNG", interactive=False)
    if examples:
        gr.Examples([[e] for e in examples], inputs=[annotator], label="Examples")
    outputs = [overlay, table, coco_file, png_file, status]
    inputs = [annotator, automatic, threshold]
    run.click(page_fn, inputs, outputs, api_name="segment")
    for event in (annotator.change, automatic.change, threshold.release):
        event(page_fn, inputs, outputs, trigger_mode="always_last", show_progress="minimal",
              api_visibility="private")


def _json_tab(handlers: Handlers) -> None:
    """The "Boxes as JSON" tab, the form of the ``segment_json`` API."""
    classes = list(handlers.segmenter.class_names)
    with gr.Row():
        with gr.Column():
            j_image = gr.File(label="Image file", type="filepath")
            j_boxes = gr.Textbox(label="Boxes (JSON)", lines=3,
                                 placeholder='[[10, 20, 110, 90], {"box": [5, 5, 50, 60], '
                                             '"label": "' + classes[0] + '"}]')
            j_mode = gr.Radio(["boxes", "automatic"], value="boxes", label="Mode")
            j_threshold = gr.Slider(0.0, 1.0, handlers.default_threshold, step=0.01,
                                    label="Score threshold (automatic mode)")
            j_run = gr.Button("Run", variant="primary")
        with gr.Column():
            j_overlay = gr.Image(label="Masks", type="numpy", format="png", interactive=False)
            j_json = gr.JSON(label="COCO JSON")
            j_png = gr.File(label="Instance-id PNG", interactive=False)
    j_run.click(make_api_handler(handlers), [j_image, j_boxes, j_mode, j_threshold],
                [j_overlay, j_json, j_png], api_name="segment_json")


def build_app(handlers: Handlers, examples: list[dict[str, Any]] | None = None) -> gr.Blocks:
    """The page: annotator + controls on the left, overlay, table and downloads on the right,
    and a second tab with the JSON-boxes form that ``/segment_json`` also serves."""
    examples = load_examples() if examples is None else examples
    with gr.Blocks(title="SIM box-prompted segmentation", analytics_enabled=False,
                   delete_cache=(1800, 3600)) as demo:
        gr.Markdown("## Box-prompted instance segmentation\n" + INTRO)
        gr.Markdown(handlers.model_markdown(), elem_id="model-info")
        with gr.Tab("Draw boxes"):
            _draw_tab(handlers, examples)
        with gr.Tab("Boxes as JSON"):
            _json_tab(handlers)

        def model_info() -> dict:
            """Backbone, classes, backend, device and input limits of the served model."""
            return {**handlers.segmenter.model_info, "max_side": handlers.max_side,
                    "max_boxes": handlers.max_boxes}

        gr.api(model_info, api_name="model_info")
    return demo


def theme() -> gr.themes.Theme:
    """Gradio's default look with system fonts (the page works offline: no Google Fonts)."""
    return gr.themes.Default(font=["ui-sans-serif", "system-ui", "sans-serif"],
                             font_mono=["ui-monospace", "monospace"])
