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
    with pytest.raises(ConfigError, match=rf"^{where}: expected"):
        load_config(TINY, [override])


@pytest.mark.parametrize(("override", "match"), [
    ("supervision=points", r"supervision='points': use 'box' or 'mask'"),
    ("mixed_precision=fp8", r"mixed_precision='fp8': use no, bf16 or fp16"),
    ("optim.optimizer=adam", r"optim.optimizer='adam': use sgd or adamw"),
    ("sim.prototype_pixels=box", r"sim.prototype_pixels='box': use 'instance'"),
    ("sim.oracle_semantic_map=true", r"needs sim.copy_paste=false"),
    ("data.synthetic_background=grey", r"data.synthetic_background='grey': use shared or distinct"),
    ("model.backbone=resnet5", r"model.backbone='resnet5' is unknown"),
    ("optim.lr", r"use key=value"),
    ("optim.lr.x=1", r"'lr' is not a section"),
])
def test_bad_values_and_override_syntax(override: str, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        load_config(TINY, [override])


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


def test_config_accepts_exactly_the_generator_backgrounds() -> None:
    """``DataConfig.synthetic_background`` is checked against a literal (the config module stays
    free of the data module's imports); it must name the generator's variants."""
    from training.data.synthetic import BACKGROUNDS

    for background in BACKGROUNDS:
        assert load_config(TINY, [f"data.synthetic_background={background}"]) \
            .data.synthetic_background == background
