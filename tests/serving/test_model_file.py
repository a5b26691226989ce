"""Checkpoint round trip (identical outputs and description) and every bad-checkpoint error."""

from __future__ import annotations

import dataclasses
import json
import os

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from sim_testing import TINY_CLASSES, tiny_model_config

from serving import CheckpointError, InferenceConfig, InputError, Segmenter, build_condinst
from serving.files import atomic_write
from serving.model.card import Provenance
from serving.model.model_file import (
    FORMAT_VERSION,
    load_checkpoint,
    new_card,
    read_checkpoint_card,
    save_checkpoint,
)
from serving.model_config import ModelConfig


def one_line(exc: pytest.ExceptionInfo) -> str:
    msg = str(exc.value)
    assert msg and "\n" not in msg, f"message is not one line: {msg!r}"
    return msg


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A tiny model with non-default BatchNorm stats and pixel mean, saved once."""
    torch.manual_seed(0)
    cfg = ModelConfig(**{**tiny_model_config().__dict__, "pixel_mean": (100.0, 110.0, 120.0)})
    model = build_condinst(cfg)
    with torch.no_grad():  # a train-mode pass moves the mask-branch BatchNorm running stats
        model.train()(torch.randn(2, 3, 64, 64) * 3)
    model.eval()
    path = tmp_path_factory.mktemp("ck") / "model.safetensors"
    infer = InferenceConfig(min_size=160, max_size=320, score_threshold=0.1)
    save_checkpoint(path, model, new_card(cfg, TINY_CLASSES, infer, made_by="train", step=7))
    return path, model, cfg, infer


def test_round_trip_identical_outputs_and_info(saved):
    path, model, cfg, infer = saved
    loaded, info = load_checkpoint(path)
    assert not loaded.training
    x = torch.randn(1, 3, 160, 96, generator=torch.Generator().manual_seed(5)) * 50 + 120
    with torch.no_grad():
        a = model(model.normalize(x))
        b = loaded(loaded.normalize(x))
    for name, ta, tb in zip(a._fields, a, b):
        assert torch.equal(ta, tb), name
    assert info.class_names == TINY_CLASSES
    assert info.model == cfg
    assert info.inference == infer
    assert info.format_version == FORMAT_VERSION == 2
    assert info.provenance.made_by == "train" and info.provenance.details == {"step": 7}
    assert read_checkpoint_card(path) == info
    # the whole state dict (incl. BatchNorm buffers) is identical
    for k, v in model.state_dict().items():
        assert torch.equal(v, loaded.state_dict()[k]), k


def test_segmenter_from_checkpoint_uses_saved_inference_config(saved):
    path, *_ = saved
    seg = Segmenter.from_checkpoint(path, device="cpu", max_detections=7)
    assert seg.cfg.min_size == 160 and seg.cfg.score_threshold == 0.1
    assert seg.cfg.max_detections == 7
    assert seg.class_names == TINY_CLASSES
    info = seg.model_info
    assert info["backbone"] == "mobilenet_v2" and info["backend"] == "torch"
    assert info["classes"] == list(TINY_CLASSES) and info["device"] == "cpu"


def test_save_rejects_wrong_class_count(tmp_path, saved):
    _, model, cfg, _ = saved
    with pytest.raises(CheckpointError, match="2 class names"):
        save_checkpoint(tmp_path / "x.safetensors", model,
                        dataclasses.replace(new_card(cfg, TINY_CLASSES), class_names=("a", "b")))
    assert not (tmp_path / "x.safetensors").exists()


def test_atomic_write_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "f.bin"
    target.write_bytes(b"old")

    def failing(tmp):
        with open(tmp, "wb") as fh:
            fh.write(b"partial")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        atomic_write(target, failing)
    assert target.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["f.bin"]


# ------------------------------------------------------------------ bad checkpoints
def test_missing_file(tmp_path):
    with pytest.raises(CheckpointError) as exc:
        load_checkpoint(tmp_path / "nope.safetensors")
    assert "not found" in one_line(exc)


@pytest.mark.parametrize("keep", [5, 0.5, 0.999])
def test_truncated_file(tmp_path, saved, keep):
    data = saved[0].read_bytes()
    n = keep if isinstance(keep, int) else int(len(data) * keep)
    bad = tmp_path / "cut.safetensors"
    bad.write_bytes(data[:n])
    with pytest.raises(CheckpointError) as exc:
        load_checkpoint(bad)
    msg = one_line(exc)
    assert "truncated" in msg or "cannot read weights" in msg


def test_random_bytes_and_text_file(tmp_path):
    rnd = tmp_path / "random.safetensors"
    rnd.write_bytes(os.urandom(4096))
    with pytest.raises(CheckpointError) as exc:
        load_checkpoint(rnd)
    assert "not a valid .safetensors checkpoint" in one_line(exc)
    txt = tmp_path / "notes.safetensors"
    txt.write_text("these are not weights\n" * 20)
    with pytest.raises(CheckpointError) as exc:
        load_checkpoint(txt)
    assert "not a valid .safetensors checkpoint" in one_line(exc)


def _rewrite(src, dst, **meta_changes):
    with safe_open(str(src), framework="pt") as f:
        meta = dict(f.metadata())
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    meta.update(meta_changes)
    save_file(tensors, str(dst), metadata={k: v for k, v in meta.items() if v is not None})
    return meta


def test_safetensors_without_our_metadata(tmp_path):
    plain = tmp_path / "plain.safetensors"
    save_file({"w": torch.zeros(3)}, str(plain))
    with pytest.raises(CheckpointError) as exc:
        load_checkpoint(plain)
    assert "missing the 'sim-condinst' header" in one_line(exc)


def test_unknown_config_key(tmp_path, saved):
    meta = _rewrite(saved[0], tmp_path / "a.safetensors")
    model_cfg = json.loads(meta["model_config"])
    model_cfg["magic_layers"] = 3
    _rewrite(saved[0], tmp_path / "a.safetensors", model_config=json.dumps(model_cfg))
    with pytest.raises(CheckpointError) as exc:
        load_checkpoint(tmp_path / "a.safetensors")
    msg = one_line(exc)
    assert "corrupt metadata" in msg and "magic_layers" in msg


def test_malformed_metadata_json(tmp_path, saved):
    _rewrite(saved[0], tmp_path / "b.safetensors", class_names="[not json")
    with pytest.raises(CheckpointError) as exc:
        read_checkpoint_card(tmp_path / "b.safetensors")
    assert "corrupt metadata" in one_line(exc)


def test_newer_format_version(tmp_path, saved):
    _rewrite(saved[0], tmp_path / "v.safetensors", format_version=str(FORMAT_VERSION + 1))
    with pytest.raises(CheckpointError) as exc:
        load_checkpoint(tmp_path / "v.safetensors")
    assert "newer than this library" in one_line(exc)


def test_weights_do_not_match_config(tmp_path, saved):
    meta = _rewrite(saved[0], tmp_path / "m.safetensors")
    model_cfg = json.loads(meta["model_config"])
    model_cfg["num_classes"] = 5
    _rewrite(saved[0], tmp_path / "m.safetensors", model_config=json.dumps(model_cfg),
             class_names=json.dumps(["a", "b", "c", "d", "e"]))
    with pytest.raises(CheckpointError) as exc:
        load_checkpoint(tmp_path / "m.safetensors")
    assert "weights do not match its model config" in one_line(exc)
    # a config describing another architecture (missing / unexpected tensors)
    model_cfg["num_classes"] = 3
    model_cfg["head_convs"] = 2
    _rewrite(saved[0], tmp_path / "n.safetensors", model_config=json.dumps(model_cfg))
    with pytest.raises(CheckpointError) as exc:
        load_checkpoint(tmp_path / "n.safetensors")
    assert "weights do not match its model config" in one_line(exc)


def test_class_names_do_not_match_num_classes(tmp_path, saved):
    _rewrite(saved[0], tmp_path / "c.safetensors", class_names=json.dumps(["only", "two"]))
    with pytest.raises(CheckpointError) as exc:
        load_checkpoint(tmp_path / "c.safetensors")
    assert "class names" in one_line(exc)


def test_segmenter_load_picks_by_extension(tmp_path, saved):
    seg = Segmenter.load(saved[0], device="cpu")
    assert seg.backend.name == "torch"
    with pytest.raises(InputError) as exc:
        Segmenter.load(tmp_path / "model.xyz")
    assert "unknown file type" in one_line(exc)
    with pytest.raises(CheckpointError) as exc:
        Segmenter.from_checkpoint(tmp_path / "missing.safetensors")
    assert "not found" in one_line(exc)


def test_model_files_are_written_with_the_umask(tmp_path) -> None:
    """Checkpoints (and every file written through atomic_write: exports, sidecars) get the
    permissions a plain open() gives (0644 under umask 022), not mkstemp's private 0600."""
    import os

    from sim_testing import TINY_CLASSES, tiny_model_config

    from serving import InferenceConfig, build_condinst
    from serving.files import UMASK, atomic_write
    from serving.model.model_file import new_card, save_checkpoint

    cfg = tiny_model_config()
    path = tmp_path / "model.safetensors"
    save_checkpoint(path, build_condinst(cfg), new_card(cfg, TINY_CLASSES, InferenceConfig()))
    other = tmp_path / "model.onnx"
    atomic_write(other, lambda tmp: open(tmp, "wb").write(b"x"))
    for p in (path, other):
        assert os.stat(p).st_mode & 0o777 == 0o666 & ~UMASK


def _inference_with(saved, **changes) -> str:
    with safe_open(str(saved[0]), framework="pt") as f:
        data = json.loads(f.metadata()["inference_config"])
    return json.dumps({**data, **changes})


@pytest.mark.parametrize("field, value, match", [
    ("format_version", "abc", "format version 'abc' is not a whole number"),
    ("class_names", "[1, 2, 3]", "class name 0 is 1; class names must be non-empty text"),
    ("class_names", '["a", ""]', "class name 1 is ''"),
    ("calibration", '{"score_threshold": NaN}',
     r"calibration score_threshold nan is not a number in \[0, 1\]"),
    ("calibration", '{"score_threshold": "0.3"}', "score_threshold '0.3'"),
    ("calibration", "[0.3]", "calibration is list, not an object"),
    ("calibration", '{"object_sizes": {"p50": "x"}}', "object_sizes is not a table of numbers"),
    ("calibration", '{"validation": 3}', "calibration validation is not text"),
    ("calibration", "[" * 100_000 + "]" * 100_000, "'calibration' is nested too deeply"),
    ("category_ids", '[1, 2]', "category_ids is not a list of 3 integers"),
    ("category_ids", '[1, 2, "x"]', "category_ids is not a list of 3 integers"),
    ("history", '{"made_by": "train"}', "history is not a list"),
    ("history", '[{"made_by": "magic"}]', "provenance entry is not an object with made_by"),
    ("history", '[{"made_by": "train", "created": 5}]', "provenance source/created"),
    ("precision", '"int4"', "precision 'int4' is not one of fp32, fp16, int8"),
    ("format_version", "3", "format version 3 is newer than this library reads"),
])
def test_crafted_card_is_one_line_error(tmp_path, saved, field, value, match):
    """Every field of a checkpoint's card is checked by the one reader
    (ModelCard.from_json with serving.model.metadata) before anything is built from it."""
    path = tmp_path / "c.safetensors"
    _rewrite(saved[0], path, **{field: value})
    with pytest.raises(CheckpointError, match=match) as exc:
        read_checkpoint_card(path)
    assert "\n" not in str(exc.value) and str(path) in str(exc.value)


@pytest.mark.parametrize("field, value, match", [
    ("format_version", "abc", "format version 'abc' is not a whole number"),
    ("class_names", "[1, 2, 3]", "class name 0 is 1; class names must be non-empty text"),
    ("class_names", '["a", ""]', "class name 1 is ''"),
    ("extra", "[1, 2]", "metadata 'extra' is list, not an object"),
    ("extra", "[" * 100_000 + "]" * 100_000, "'extra' is nested too deeply"),
    ("extra", '{"calibration": {"score_threshold": NaN}}',
     r"calibration score_threshold nan is not a number in \[0, 1\]"),
    ("extra", '{"calibration": {"score_threshold": "0.3"}}', "score_threshold '0.3'"),
    ("extra", '{"calibration": {"score_threshold": [0.3]}}', r"score_threshold \[0.3\]"),
    ("extra", '{"calibration": [0.3]}', "calibration is list, not an object"),
    ("extra", '{"calibration": {"prompt_scores": {"p50": "x"}}}', "not a table of numbers"),
    ("inference_config", None, "no 'inference_config' field"),
])
def test_crafted_version_1_metadata_is_one_line_error(tmp_path, saved, field, value, match):
    """A version-1 checkpoint (calibration inside ``extra``) is checked as closely on its way
    through the migration."""
    path = tmp_path / "c.safetensors"
    _rewrite(saved[0], path, **{"format_version": "1", "calibration": None, "history": None,
                                field: value})
    with pytest.raises(CheckpointError, match=match) as exc:
        read_checkpoint_card(path)
    assert "\n" not in str(exc.value) and str(path) in str(exc.value)


@pytest.mark.parametrize("changes, match", [
    ({"score_threshold": "0.5"}, "inference.score_threshold='0.5': expected a number"),
    ({"score_threshold": [0.5]}, r"inference.score_threshold=\[0.5\]: expected a number"),
    ({"max_detections": 10**9}, r"inference.max_detections=1000000000: must be within"),
])
def test_crafted_inference_config_is_one_line_error(tmp_path, saved, changes, match):
    path = tmp_path / "i.safetensors"
    _rewrite(saved[0], path, inference_config=_inference_with(saved, **changes))
    with pytest.raises(CheckpointError, match=match):
        read_checkpoint_card(path)


@pytest.mark.parametrize("changes, match", [
    ({"input_rules": {"static_shape": [1, 2]}}, r"static_shape \[1, 2\] is not \[batch"),
    ({"input_rules": {"static_shape": [-1, 64, 64]}}, r"static_shape \[-1, 64, 64\]"),
    ({"precision": "int4"}, "precision 'int4' is not one of fp32, fp16, int8"),
    ({"format_version": "abc"}, "format version 'abc'"),
    ({"class_names": [0, 1, 2]}, "class name 0 is 0"),
    ({"graphs": ["x"]}, "'graphs' must be objects"),
    ({"extra": {"checkpoint_extra": {"calibration": {"score_threshold": 7}}}},
     "score_threshold 7 is not a number"),
])
def test_crafted_sidecar_is_one_line_error(tmp_path, changes, match):
    from serving.backends.exported import build_sidecar, input_rules, read_sidecar

    card = new_card(tiny_model_config(), TINY_CLASSES)
    card = card.step(Provenance.now("export onnx"), input_rules=input_rules(card.inference))
    data = build_sidecar(export_id="0" * 32, card=card,
                         graphs={"automatic": {"file": "m.auto.onnx"}})
    path = tmp_path / "m.json"
    path.write_text(json.dumps(data))
    assert read_sidecar(path).card == card  # the untouched sidecar reads
    if "extra" in changes:  # a version-1 sidecar: calibration inside extra.checkpoint_extra
        changes = {**changes, "format_version": 1}
    path.write_text(json.dumps({**data, **changes}))
    with pytest.raises(CheckpointError, match=match) as exc:
        read_sidecar(path)
    assert "\n" not in str(exc.value)
