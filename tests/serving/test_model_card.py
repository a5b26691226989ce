"""The model card: JSON round trip, the one migration of format versions 0/1, calibration
merging and provenance steps (hand-made values)."""

from __future__ import annotations

import datetime
import importlib.metadata
import json

import pytest
from sim_testing import TINY_CLASSES, tiny_model_config

from serving import CheckpointError, InferenceConfig
from serving.model.card import CARD_VERSION, Calibration, ModelCard, Provenance, migrate
from serving.model_config import config_to_dict


def full_card() -> ModelCard:
    cfg = tiny_model_config()
    return ModelCard(
        TINY_CLASSES, cfg, InferenceConfig(min_size=160, max_size=320),
        Calibration(score_threshold=0.25, f1=61.5, prompt_scores={"p50": 0.7},
                    object_sizes={"p10": 10.0, "p50": 20.0, "p90": 40.0}, validation="v.json"),
        category_ids=(3, 5, 9), precision="int8", input_rules={"static_shape": [1, 64, 96]},
        history=(Provenance("train", None, "2026-01-01T00:00:00+00:00", "0.1.0", {"step": 5}),
                 Provenance("export int8", "m.json", "2026-01-02T00:00:00+00:00", "0.1.0")))


def test_json_round_trip_is_exact() -> None:
    card = full_card()
    data = json.loads(json.dumps(card.to_json()))
    assert data["format_version"] == CARD_VERSION == 2
    assert data["calibration"] == {"score_threshold": 0.25, "f1": 61.5,
                                   "prompt_scores": {"p50": 0.7}, "validation": "v.json",
                                   "object_sizes": {"p10": 10.0, "p50": 20.0, "p90": 40.0}}
    assert ModelCard.from_json(data, "here") == card
    assert card.provenance.made_by == "export int8" and card.provenance.source == "m.json"


def test_version_1_checkpoint_is_migrated() -> None:
    cfg = tiny_model_config()
    old = {"format_version": "1", "model_config": config_to_dict(cfg),
           "inference_config": config_to_dict(InferenceConfig()),
           "class_names": list(TINY_CLASSES),
           "extra": {"step": 7, "category_ids": [1, 2, 3], "benchmark": "note",
                     "calibration": {"score_threshold": 0.5, "auto_scores": {"p50": 0.9},
                                     "future_key": 1}}}
    card = ModelCard.from_json(old, "here")
    assert card.format_version == 1 and card.category_ids == (1, 2, 3)
    assert card.calibration == Calibration(score_threshold=0.5, auto_scores={"p50": 0.9})
    assert card.history == (Provenance("train", details={"step": 7, "benchmark": "note"}),)
    # without training details the maker is unknown; version 0 reads the same way
    bare = ModelCard.from_json({**old, "format_version": "0", "extra": {}}, "here")
    assert bare.history == (Provenance("unknown"),) and bare.calibration == Calibration()


def test_version_1_sidecar_is_migrated() -> None:
    extra = {"opset": 18, "exporter": "dynamo", "dynamic": True,
             "checkpoint_extra": {"step": 3, "category_ids": [4, 5, 6],
                                  "calibration": {"f1": 12.0}}}
    moved = migrate({"extra": extra, "precision": "fp32"}, 1, "export", "here")
    assert moved["calibration"] == {"f1": 12.0} and moved["category_ids"] == [4, 5, 6]
    assert [h["made_by"] for h in moved["history"]] == ["train", "export onnx"]
    assert moved["history"][0]["details"] == {"step": 3}
    assert moved["history"][1]["details"] == {"opset": 18, "exporter": "dynamo",
                                              "dynamic": True}
    int8 = migrate({"extra": extra, "precision": "int8"}, 1, "export", "here")
    assert int8["history"][1]["made_by"] == "export int8"
    assert migrate({"a": 1}, CARD_VERSION, "export", "here") == {"a": 1}  # current: as is
    with pytest.raises(CheckpointError, match="here: metadata 'extra' is list"):
        migrate({"extra": [1]}, 1, "checkpoint", "here")


def test_calibration_merge_keeps_what_the_newer_does_not_set() -> None:
    old = Calibration(score_threshold=0.3, f1=50.0, object_sizes={"p50": 20.0})
    new = Calibration(score_threshold=0.4, prompt_scores={"p50": 0.6})
    assert old.merged(new) == Calibration(score_threshold=0.4, f1=50.0,
                                          prompt_scores={"p50": 0.6},
                                          object_sizes={"p50": 20.0})
    assert Calibration().to_dict() == {} and old.merged(Calibration()) == old


def test_a_step_records_who_when_and_the_library() -> None:
    before = datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0)
    card = full_card().step(Provenance.now("export tensorrt", "m.auto.onnx", precision="fp16"))
    step = card.provenance
    assert step.made_by == "export tensorrt" and step.details == {"precision": "fp16"}
    assert datetime.datetime.fromisoformat(step.created) >= before
    assert step.library_version == importlib.metadata.version("sim-boxseg")
    assert len(card.history) == 3 and card.format_version == CARD_VERSION
