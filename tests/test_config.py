"""Config loading: inheritance, overrides, validation errors, and the shipped configs."""

from __future__ import annotations

from pathlib import Path

import pytest

from detkit.config import (
    ClassificationConfig,
    ConfigError,
    DetectionConfig,
    load_config,
    parse_overrides,
    save_config,
)

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture()
def cfg_dir(tmp_path: Path) -> Path:
    (tmp_path / "base.yaml").write_text("model:\n  backbone:\n    name: resnet18\n    norm: BN\ntrain:\n  max_iters: 10\n")
    (tmp_path / "mid.yaml").write_text("_base_: base.yaml\ntrain:\n  base_lr: 0.5\n")
    (tmp_path / "child.yaml").write_text("_base_: [mid.yaml]\nmodel:\n  backbone:\n    freeze_at: 0\n")
    return tmp_path


def test_inheritance_deep_merges(cfg_dir: Path) -> None:
    cfg = load_config(cfg_dir / "child.yaml")
    assert isinstance(cfg, DetectionConfig)
    assert cfg.model.backbone.name == "resnet18"  # from base
    assert cfg.model.backbone.norm == "BN"  # sibling key survives the child's merge
    assert cfg.model.backbone.freeze_at == 0  # from child
    assert cfg.train.base_lr == 0.5 and cfg.train.max_iters == 10


def test_overrides_parse_yaml_scalars_and_lists(cfg_dir: Path) -> None:
    cfg = load_config(
        cfg_dir / "child.yaml",
        ["train.max_iters=7", "input.min_size_train=[320, 352]", "model.weights=w.pth", "train.ema=true"],
    )
    assert cfg.train.max_iters == 7
    assert cfg.input.min_size_train == [320, 352]
    assert cfg.model.weights == "w.pth"
    assert cfg.train.ema is True


def test_unknown_key_suggests_nearest(cfg_dir: Path) -> None:
    with pytest.raises(ConfigError) as e:
        load_config(cfg_dir / "child.yaml", ["train.max_iter=3"])
    msg = str(e.value)
    assert "train.max_iter" in msg and "train.max_iters" in msg and "\n" not in msg


def test_unknown_key_in_file_names_the_file(tmp_path: Path) -> None:
    p = tmp_path / "bad.yaml"
    p.write_text("model:\n  backbnoe:\n    name: resnet18\n")
    with pytest.raises(ConfigError) as e:
        load_config(p)
    assert str(p) in str(e.value) and "model.backbone" in str(e.value)


def test_wrong_type_names_key_and_type(cfg_dir: Path) -> None:
    with pytest.raises(ConfigError) as e:
        load_config(cfg_dir / "child.yaml", ["train.max_iters=lots"])
    assert "train.max_iters" in str(e.value) and "int" in str(e.value)
    with pytest.raises(ConfigError, match="model.backbone.norm"):
        load_config(cfg_dir / "child.yaml", ["model.backbone.norm=LayerNorm"])


@pytest.mark.parametrize("bad", ["train.max_iters", "=3", "train..x=1", "a.b=[1, 2"])
def test_bad_override_syntax(bad: str) -> None:
    with pytest.raises(ConfigError):
        parse_overrides([bad])


def test_missing_file_and_bad_yaml(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    p = tmp_path / "broken.yaml"
    p.write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match="invalid YAML"):
        load_config(p)


def test_circular_base_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "a.yaml").write_text("_base_: b.yaml\n")
    (tmp_path / "b.yaml").write_text("_base_: a.yaml\n")
    with pytest.raises(ConfigError, match="circular"):
        load_config(tmp_path / "a.yaml")


def test_save_and_reload_roundtrip(cfg_dir: Path, tmp_path: Path) -> None:
    cfg = load_config(cfg_dir / "child.yaml", ["input.min_size_train=[100, 200]"])
    out = tmp_path / "out" / "config.yaml"
    save_config(cfg, out)
    assert load_config(out) == cfg


def test_classification_task(tmp_path: Path) -> None:
    p = tmp_path / "cls.yaml"
    p.write_text("task: classification\nmodel:\n  arch: resnet50\n")
    cfg = load_config(p, ["train.epochs=3", "input.size=96"])
    assert isinstance(cfg, ClassificationConfig)
    assert (cfg.model.arch, cfg.train.epochs, cfg.input.size) == ("resnet50", 3, 96)
    with pytest.raises(ConfigError, match="task"):
        load_config(p, ["task=segmentation"])


ALL_CONFIGS = sorted(p for p in (REPO / "configs").rglob("*.yaml") if "_base_" not in p.parts)


@pytest.mark.parametrize("path", ALL_CONFIGS, ids=lambda p: str(p.relative_to(REPO / "configs")))
def test_every_shipped_config_validates(path: Path) -> None:
    cfg = load_config(path)
    assert cfg.task in ("detection", "classification")


def test_coco_zoo_configs_compose_as_named() -> None:
    r101 = load_config(REPO / "configs/coco/mask_rcnn_R_101_FPN_3x.yaml")
    assert r101.model.backbone.name == "resnet101" and r101.model.meta_architecture == "mask_rcnn"
    assert r101.train.max_iters == 270000
    x101 = load_config(REPO / "configs/coco/mask_rcnn_X_101_32x8d_FPN_3x.yaml")
    assert x101.model.backbone.name == "resnext101_32x8d"
    r18 = load_config(REPO / "configs/coco/faster_rcnn_R_18_FPN_1x.yaml")
    assert r18.model.backbone.name == "resnet18" and r18.model.meta_architecture == "faster_rcnn"
    assert r18.train.max_iters == 90000
