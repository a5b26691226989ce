"""``python -m app``'s command line: option checks and a clear error for a bad model file."""

from __future__ import annotations

import pytest

pytest.importorskip("gradio", reason="the app needs the 'app' extra: pip install -e .[app]")
pytest.importorskip("gradio_image_annotation", reason="the app needs the 'app' extra")


def test_defaults():
    from app.launch import parse_args

    args = parse_args(["--model", "m.safetensors"])
    assert (args.host, args.port, args.share, args.device) == ("127.0.0.1", 7860, "off", "auto")
    assert (args.max_upload_mb, args.max_side, args.concurrency) == (20.0, 4096, 2)
    assert args.max_boxes == 256  # per request, whatever the model's max_prompt_boxes


@pytest.mark.parametrize("argv", [[], ["--port", "-1"], ["--concurrency", "0"],
                                  ["--max-upload-mb", "0"], ["--max-boxes", "0"],
                                  ["--share", "maybe"], ["--max-side", "0"]])
def test_bad_options_exit_with_usage(argv, capsys):
    from app.launch import parse_args

    with pytest.raises(SystemExit) as exc:
        parse_args((["--model", "m.onnx"] if argv else []) + argv)
    assert exc.value.code == 2
    assert "usage: python -m app" in capsys.readouterr().err


@pytest.mark.parametrize("name, fragment", [("missing.safetensors", "missing.safetensors"),
                                            ("model.bin", "unknown file type '.bin'")])
def test_bad_model_file_is_a_one_line_error(tmp_path, capsys, name, fragment):
    from app.launch import main

    assert main(["--model", str(tmp_path / name)]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and fragment in err and "\n" not in err


def test_image_size_reaches_the_model(tiny_checkpoint, monkeypatch):
    """``sim app --image-size`` loads the model at that input size (the page is not served)."""
    from app.launch import create_app, parse_args
    from serving import Segmenter

    load = Segmenter.load.__func__
    seen: list = []

    def spy(cls, path, **kwargs):
        seg = load(cls, path, **kwargs)
        seen.append((seg.cfg.min_size, seg.cfg.max_size))
        return seg

    monkeypatch.setattr(Segmenter, "load", classmethod(spy))
    create_app(parse_args(["--model", str(tiny_checkpoint), "--device", "cpu", "--image-size",
                           "64", "96"]))
    assert seen == [(64, 96)]
