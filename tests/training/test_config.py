"""Training configuration: YAML experiments, dotted overrides, type checks, suggestions, and the
warm-ups that scale with the schedule."""

from __future__ import annotations

from pathlib import Path

import pytest

from training.config import (
    PHASE_FLOOR,
    ConfigError,
    OptimConfig,
    TrainConfig,
    load_config,
    save_config,
)

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "configs" / "tiny.yaml"
SHIPPED = sorted((REPO / "configs").glob("*.yaml"))


def test_yaml_values_and_tuples_from_lists() -> None:
    cfg = load_config(TINY)
    assert cfg.data.min_sizes == (96, 128)  # YAML list -> tuple[int, ...]
    assert cfg.optim.steps == (4,)
    assert cfg.optim.max_iter == 6
    assert cfg.sim.start_iter == 2
    assert cfg.model.backbone_weights is None  # YAML null
    assert cfg.sim.tau_high_range == (0.7, 0.8)  # default untouched by the file
    assert cfg.boxinst == TrainConfig().boxinst  # section absent from the file -> defaults


def test_yaml_exponent_numbers_without_a_dot_are_numbers(tmp_path: Path) -> None:
    path = tmp_path / "x.yaml"
    path.write_text("optim:\n  lr: 1e-3\n  weight_decay: 5E-5\n")
    cfg = load_config(path, ["sim.alpha=1e-1"])
    assert (cfg.optim.lr, cfg.optim.weight_decay, cfg.sim.alpha) == (0.001, 5e-05, 0.1)


def test_dotted_overrides_are_parsed_and_coerced() -> None:
    cfg = load_config(TINY, ["optim.lr=0.005", "sim.alpha=1", "data.min_sizes=[64, 80]",
                             "sim.tau_high_range=[0.6, 0.9]", "data.val_json=null",
                             "optim.clip_grad_norm=5", "sim.copy_paste=false",
                             "output_dir=runs/x=y"])
    assert cfg.optim.lr == 0.005
    assert cfg.sim.alpha == 1.0 and isinstance(cfg.sim.alpha, float)  # int -> float field
    assert cfg.data.min_sizes == (64, 80)
    assert cfg.sim.tau_high_range == (0.6, 0.9)
    assert cfg.data.val_json is None
    assert cfg.optim.clip_grad_norm == 5.0
    assert cfg.sim.copy_paste is False
    assert cfg.output_dir == "runs/x=y"  # split on the first '=' only
    # A scalar for a variable-length tuple becomes a 1-tuple.
    assert load_config(TINY, ["optim.steps=3"]).optim.steps == (3,)
    # Overrides without a file apply to the defaults.
    assert load_config(None, ["optim.max_iter=10"]).optim.max_iter == 10


@pytest.mark.parametrize(("override", "named", "suggestion"), [
    ("optim.lrr=0.1", "optim.lrr", "'lr'"),
    ("optm.lr=0.1", "optm", "'optim'"),
    ("sim.alpah=0.3", "sim.alpah", "'alpha'"),
])
def test_unknown_key_names_it_and_suggests(override: str, named: str, suggestion: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(TINY, [override])
    message = str(info.value)
    assert f"'{named}'" in message
    assert f"did you mean {suggestion}" in message
    assert "\n" not in message


def test_unknown_key_without_close_match_has_no_suggestion() -> None:
    with pytest.raises(ConfigError, match=r"unknown config key 'zzz'$"):
        load_config(TINY, ["zzz=1"])


def test_unknown_key_in_yaml_file(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("optim:\n  lr: 0.1\n  momentun: 0.9\n")
    with pytest.raises(ConfigError, match=r"'optim.momentun'.*did you mean 'momentum'"):
        load_config(path)


@pytest.mark.parametrize(("override", "where"), [
    ("optim.lr=abc", "optim.lr"),
    ("optim.max_iter=1.5", "optim.max_iter"),
    ("optim.max_iter=true", "optim.max_iter"),  # bool is not an int here
    ("sim.alpha=[1]", "sim.alpha"),
    ("sim.copy_paste=maybe", "sim.copy_paste"),
    ("sim.tau_high_range=[0.7]", "sim.tau_high_range"),  # wrong tuple length
    ("data.min_sizes=[96, big]", "data.min_sizes"),
    ("output_dir=3", "output_dir"),
    ("sim.start_iter=2.5", "sim.start_iter"),  # int | None
])
def test_wrong_types_are_rejected(override: str, where: str) -> None:
    with pytest.raises(ConfigError, match=rf"^{where}=.*: expected") as info:
        load_config(TINY, [override])
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(("override", "match"), [
    # Literal choices, from the annotations.
    ("supervision=points", r"^supervision='points': use 'box' or 'mask'$"),
    ("mixed_precision=fp8", r"^mixed_precision='fp8': use 'no', 'bf16' or 'fp16'$"),
    ("optim.optimizer=adam", r"^optim.optimizer='adam': use 'sgd' or 'adamw'$"),
    ("sim.prototype_pixels=box", r"^sim.prototype_pixels='box': use 'instance' or 'pseudo'$"),
    ("boxinst.pairwise_affinity=colour", r"'color' or 'color_feature'$"),
    ("model.backbone=resnet5", r"^model.backbone='resnet5': use 'mobilenet_v2', 'resnet50'"),
    # Ranges, from the annotations (the library's sections too).
    ("optim.lr=0", r"^optim.lr=0.0: must be > 0$"),
    ("optim.batch_size=0", r"^optim.batch_size=0: must be >= 1$"),
    ("sim.alpha=1.5", r"^sim.alpha=1.5: must be within \[0, 1\]$"),
    ("sim.tau_high_range=[0.7, 1.2]", r"^sim.tau_high_range=\[0.7, 1.2\]: must be within"),
    ("data.min_sizes=[96, 16]", r"^data.min_sizes=\[96, 16\]: must be within \[32, 4096\]$"),
    ("data.min_sizes=[100000]", r"^data.min_sizes=\[100000\]: must be within \[32, 4096\]$"),
    ("inference.max_size=100000", r"^inference.max_size=100000: must be within \[32, 4096\]$"),
    ("inference.max_detections=1000000000", r"must be within \[1, 1000\]$"),
    ("optim.clip_grad_norm=-1", r"^optim.clip_grad_norm=-1.0: must be > 0$"),
    ("sim.start_iter=-1", r"^sim.start_iter=-1: must be >= 0$"),
    ("model.fpn_channels=100000", r"^model.fpn_channels=100000: must be within \[1, 2048\]$"),
    ("inference.score_threshold=2", r"^inference.score_threshold=2.0: must be within"),
    ("optim.lr=null", r"^optim.lr=null: expected a number$"),
    # Checks across fields.
    ("sim.tau_high_range=[0.8, 0.7]", r"low <= high"),
    ("sim.paste_min=4", r"sim.paste_min=4 is above sim.paste_max=3"),
    ("data.min_sizes=[]", r"give at least one training size"),
    ("inference.min_size=900", r"need 32 <= min_size <= max_size"),
    # Override syntax.
    ("optim.lr", r"use key=value"),
    ("optim.lr.x=1", r"'lr' is not a section"),
])
def test_bad_values_and_override_syntax(override: str, match: str) -> None:
    with pytest.raises(ConfigError, match=match) as info:
        load_config(TINY, [override])
    assert "\n" not in str(info.value)


def test_bad_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")
    broken = tmp_path / "broken.yaml"
    broken.write_text("optim: [1,\n")
    with pytest.raises(ConfigError, match="invalid YAML") as info:
        load_config(broken)
    assert "\n" not in str(info.value)
    listing = tmp_path / "list.yaml"
    listing.write_text("- 1\n- 2\n")
    for overrides in ([], ["optim.lr=0.1"]):
        with pytest.raises(ConfigError, match="expected a mapping"):
            load_config(listing, overrides)
    scalar_section = tmp_path / "scalar.yaml"
    scalar_section.write_text("optim: 5\n")
    with pytest.raises(ConfigError, match="optim.*expected a mapping"):
        load_config(scalar_section)


@pytest.mark.parametrize("path", SHIPPED, ids=[p.name for p in SHIPPED])
def test_every_shipped_config_loads(path: Path) -> None:
    cfg = load_config(path)
    assert isinstance(cfg, TrainConfig)
    assert cfg.optim.max_iter > max(cfg.optim.steps)
    n = cfg.optim.max_iter
    assert cfg.pairwise_warmup_iters == max(1, round(n / 9), min(PHASE_FLOOR, n // 3))


def test_paper_schedules() -> None:
    r50 = load_config(REPO / "configs" / "sim_r50_fpn_1x.yaml")
    assert (r50.optim.lr, r50.optim.steps, r50.optim.max_iter) == (0.01, (60000, 80000), 90000)
    assert r50.pairwise_warmup_iters == 10000 and r50.sim_start_iter == 10000
    r101 = load_config(REPO / "configs" / "sim_r101_fpn_3x.yaml")
    assert (r101.optim.steps, r101.optim.max_iter) == ((210000, 250000), 270000)
    assert r101.pairwise_warmup_iters == 30000 and r101.sim_start_iter == 30000


@pytest.mark.parametrize(("max_iter", "expected"), [
    (90000, 10000), (270000, 30000), (1200, 133),  # max_iter / 9 (the paper's 10k of 90k)
    (600, 100), (300, 100), (120, 40), (18, 6),  # the floor: min(100, max_iter // 3)
    (6, 2), (4, 1), (2, 1)])
def test_warmups_scale_with_max_iter(max_iter: int, expected: int) -> None:
    assert PHASE_FLOOR == 100
    cfg = load_config(None, [f"optim.max_iter={max_iter}", "optim.steps=[1]"])
    assert cfg.pairwise_warmup_iters == expected
    assert cfg.sim_start_iter == expected


def test_explicit_warmups_win() -> None:
    cfg = load_config(TINY, ["boxinst.pairwise_warmup_iters=7", "optim.max_iter=900"])
    assert cfg.pairwise_warmup_iters == 7
    assert cfg.sim_start_iter == 2  # from tiny.yaml
    assert load_config(TINY, ["sim.start_iter=null"]).sim_start_iter == 2  # 6 // 3 > 6 / 9


def test_save_and_reload_round_trip(tmp_path: Path) -> None:
    cfg = load_config(TINY, ["optim.lr=0.02", "sim.tau_high_range=[0.6, 0.9]"])
    save_config(cfg, tmp_path / "sub" / "config.yaml")
    assert load_config(tmp_path / "sub" / "config.yaml") == cfg


def test_main_reports_config_errors_in_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    from training.train import main

    assert main(["--config", str(TINY), "optim.lrr=1"]) == 1
    err = capsys.readouterr().err.strip()
    assert err == "error: unknown config key 'optim.lrr' (did you mean 'lr'?)"


def test_optim_config_defaults_follow_the_paper() -> None:
    optim = OptimConfig()
    assert (optim.optimizer, optim.lr, optim.momentum, optim.weight_decay) == \
        ("sgd", 0.01, 0.9, 1e-4)


def test_the_schema_also_holds_for_configs_built_in_python() -> None:
    """The checks live in the dataclasses, not only in the YAML loader."""
    from serving.config import InferenceConfig, ModelConfig
    from serving.errors import InputError
    from training.config import BoxInstConfig, SIMConfig

    with pytest.raises(InputError, match=r"^supervision='points': use 'box' or 'mask'$"):
        TrainConfig(supervision="points")
    with pytest.raises(InputError, match=r"^optim.max_iter=0: must be >= 1$"):
        OptimConfig(max_iter=0)
    with pytest.raises(InputError, match=r"^sim.tau=0.0: must be > 0$"):
        SIMConfig(tau=0.0)
    with pytest.raises(InputError, match=r"^boxinst.color_threshold='0.3': expected a number"):
        BoxInstConfig(color_threshold="0.3")
    with pytest.raises(InputError, match=r"^model.dynamic_layers=1: must be within \[2, 16\]$"):
        ModelConfig(dynamic_layers=1)
    with pytest.raises(InputError, match=r"^inference.clip_to_box=1: expected true or false$"):
        InferenceConfig(clip_to_box=1)
    with pytest.raises(InputError, match=r"^model.pixel_std=\[58.0, 0.0, 57.0\]: must be > 0$"):
        ModelConfig(pixel_std=(58.0, 0.0, 57.0))
    assert ModelConfig(pixel_std=[1, 2, 3]).pixel_std == (1.0, 2.0, 3.0)  # lists and ints


def test_checkpoint_metadata_is_held_to_the_same_schema() -> None:
    """``serving.model.checkpoint`` builds the library's configs from JSON: a crafted size is
    refused before any network is built."""
    from serving.config import ModelConfig, config_from_dict, config_to_dict
    from serving.errors import InputError

    data = config_to_dict(ModelConfig(backbone="mobilenet_v2", num_classes=3))
    assert config_from_dict(ModelConfig, data) == ModelConfig(backbone="mobilenet_v2",
                                                              num_classes=3)
    for key, value in [("fpn_channels", 100000), ("num_classes", "3"), ("head_convs", -1),
                       ("backbone", "vgg16"), ("pixel_mean", ["a", 1, 2])]:
        with pytest.raises(InputError, match=rf"^model.{key}="):
            config_from_dict(ModelConfig, {**data, key: value})


# --------------------------------------------------------------------------- presets
def test_presets_set_exactly_their_keys() -> None:
    from serving.config import config_to_dict
    from training.config import PRESET_HELP, PRESETS

    assert set(PRESETS) == set(PRESET_HELP) == {"sim", "sim_bg", "boxinst", "mask"}

    def changed(preset: str) -> dict:
        base = _flat(config_to_dict(load_config(None)))
        got = _flat(config_to_dict(load_config(None, preset=preset)))
        return {k: v for k, v in got.items() if base[k] != v}

    assert changed("sim") == {}  # the paper's method is the defaults
    assert changed("sim_bg") == {"sim.pseudo_foreground": False, "sim.alpha": 0.0}
    assert changed("boxinst") == {"sim.enabled": False}
    assert changed("mask") == {"supervision": "mask", "sim.enabled": False}
    sim = load_config(None, preset="sim")
    assert (sim.sim.tau, sim.sim.mu, sim.sim.alpha, sim.sim.lambda_pseudo) == (1.0, 5.0, 0.5, 0.1)


def _flat(data: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in data.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[prefix + key] = value
    return out


def test_preset_comes_first_then_the_file_then_the_overrides(tmp_path: Path) -> None:
    path = tmp_path / "exp.yaml"
    path.write_text("preset: sim_bg\nsim:\n  alpha: 0.25\noptim:\n  lr: 0.02\n")
    cfg = load_config(path)
    assert (cfg.sim.pseudo_foreground, cfg.sim.alpha, cfg.optim.lr) == (False, 0.25, 0.02)
    cfg = load_config(path, ["sim.alpha=0.75"])
    assert cfg.sim.alpha == 0.75 and cfg.sim.pseudo_foreground is False
    # --preset (or preset=NAME among the overrides) replaces the file's preset; the file's own
    # keys still apply over it.
    for cfg in (load_config(path, preset="boxinst"), load_config(path, ["preset=boxinst"])):
        assert cfg.sim.enabled is False and cfg.sim.pseudo_foreground is True
        assert cfg.sim.alpha == 0.25
    # The resolved config is saved in full and reloads equal, whatever the preset.
    save_config(load_config(path), tmp_path / "resolved.yaml")
    assert "preset" not in (tmp_path / "resolved.yaml").read_text()
    assert load_config(tmp_path / "resolved.yaml") == load_config(path)


def test_unknown_preset_suggests_the_closest(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"^unknown preset 'simbg' \(did you mean 'sim_bg'\?\); "
                                          r"choose one of sim, sim_bg, boxinst, mask$"):
        load_config(None, preset="simbg")
    path = tmp_path / "exp.yaml"
    path.write_text("preset: maks\n")
    with pytest.raises(ConfigError, match=r"did you mean 'mask'"):
        load_config(path)


def test_cli_preset_and_print_config(capsys: pytest.CaptureFixture[str]) -> None:
    import yaml

    from training.train import main

    assert main(["--config", str(TINY), "--preset", "sim_bg", "--print-config",
                 "optim.lr=0.5"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["sim"]["pseudo_foreground"] is False and printed["sim"]["alpha"] == 0.0
    assert printed["optim"]["lr"] == 0.5 and printed["optim"]["max_iter"] == 6  # tiny.yaml
    assert main(["--preset", "sim-bg", "--print-config"]) == 1
    assert capsys.readouterr().err.strip() == \
        "error: unknown preset 'sim-bg' (did you mean 'sim_bg'?); choose one of sim, sim_bg, " \
        "boxinst, mask"
