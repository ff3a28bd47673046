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


@pytest.mark.parametrize(
    "override, expected",
    [
        # Union: one entry for the key itself, not one per union member ('input.min_size_train.int')
        ("input.min_size_train=abc", "config key 'input.min_size_train': expected int or list[int], got 'abc'"),
        ("input.min_size_train=[1, x]", "config key 'input.min_size_train': expected int or list[int], got [1, 'x']"),
        # Optional
        ("model.num_classes=many", "config key 'model.num_classes': expected int or null, got 'many'"),
        ("train.weight_decay_bias=x", "config key 'train.weight_decay_bias': expected float or null, got 'x'"),
        ("data.class_names=[1, b]", "config key 'data.class_names': expected list[str] or null, got [1, 'b']"),
        ("data.synthetic=5", "config key 'data.synthetic': expected mapping or null, got 5"),
        # Literal
        ("model.backbone.norm=LayerNorm",
         "config key 'model.backbone.norm': expected one of 'BN', 'FrozenBN', 'GN', 'SyncBN', '', got 'LayerNorm'"),
        # fixed-length tuples: the key, not 'model.pixel_mean.2: Field required'
        ("model.pixel_mean=[1, 2]", "config key 'model.pixel_mean': expected list of 3 floats, got [1, 2]"),
        ("model.rpn.iou_thresholds=[0.1, 0.2, 0.3]",
         "config key 'model.rpn.iou_thresholds': expected list of 2 floats, got [0.1, 0.2, 0.3]"),
        # nested lists: the key, not 'model.anchors.sizes.1.0'
        ("model.anchors.sizes=[[32], [x]]", "config key 'model.anchors.sizes': expected list[list[float]], got [[32], ['x']]"),
        ("train.max_iters=lots", "config key 'train.max_iters': expected int, got 'lots'"),
        ("model.backbone=5", "config key 'model.backbone': expected mapping, got 5"),
        # a constraint keeps pydantic's wording
        ("model.backbone.freeze_at=9", "config key 'model.backbone.freeze_at': input should be less than or equal to 5, got 9"),
    ],
)
def test_type_errors_name_the_key_and_a_readable_type(cfg_dir: Path, override: str, expected: str) -> None:
    with pytest.raises(ConfigError) as e:
        load_config(cfg_dir / "child.yaml", [override])
    assert str(e.value) == f"{cfg_dir / 'child.yaml'}: {expected}"


def test_several_errors_give_one_entry_each(cfg_dir: Path) -> None:
    with pytest.raises(ConfigError) as e:
        load_config(cfg_dir / "child.yaml", ["input.min_size_train=abc", "model.pixel_mean=[1, 2]", "train.max_itr=3"])
    msg = str(e.value)
    assert "\n" not in msg and msg.count("config key") == 3
    assert "config key 'input.min_size_train': expected int or list[int], got 'abc'" in msg
    assert "config key 'model.pixel_mean': expected list of 3 floats, got [1, 2]" in msg
    assert "unknown config key 'train.max_itr'; did you mean 'train.max_iters'?" in msg
    assert "min_size_train.int" not in msg and "list[int]'" not in msg and "Field required" not in msg


def test_misspelt_key_under_optional_section_suggests_nearest(cfg_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as e:
        load_config(cfg_dir / "child.yaml", ["data.synthetic.num_trian=5"])
    assert str(e.value).endswith("unknown config key 'data.synthetic.num_trian'; did you mean 'data.synthetic.num_train'?")
    p = tmp_path / "cls.yaml"
    p.write_text("task: classification\ndata:\n  synthetic:\n    image_sise: 32\n")
    with pytest.raises(ConfigError) as e:
        load_config(p)
    assert "did you mean 'data.synthetic.image_size'?" in str(e.value)
    # a type error inside the optional section names the key too
    with pytest.raises(ConfigError) as e:
        load_config(cfg_dir / "child.yaml", ["data.synthetic.num_train=x"])
    assert str(e.value).endswith("config key 'data.synthetic.num_train': expected int, got 'x'")


def test_unknown_architecture_names_key_value_and_nearest(cfg_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as e:
        load_config(cfg_dir / "child.yaml", ["model.backbone.name=resnet19"])
    msg = str(e.value)
    assert "config key 'model.backbone.name': unknown architecture 'resnet19'; did you mean 'resnet18'?" in msg
    assert "\n" not in msg
    p = tmp_path / "cls.yaml"
    p.write_text("task: classification\n")
    with pytest.raises(ConfigError) as e:
        load_config(p, ["model.arch=resnext50_32x8d"])
    assert "config key 'model.arch': unknown architecture 'resnext50_32x8d'; did you mean 'resnext50_32x4d'?" in str(e.value)
    with pytest.raises(ConfigError) as e:  # nothing close: list the valid names
        load_config(p, ["model.arch=vgg16"])
    assert "config key 'model.arch': unknown architecture 'vgg16'; valid names: resnet18, resnet34," in str(e.value)
    for arch in ("resnet152", "wide_resnet101_2", "resnext101_64x4d"):
        assert load_config(p, [f"model.arch={arch}"]).model.arch == arch


def test_config_arch_list_matches_the_models() -> None:
    # config may not import models (tests/test_layering.py), so the names are repeated there
    from detkit.config.schema import RESNET_ARCHS
    from detkit.models.backbones.resnet import ARCHS

    assert RESNET_ARCHS == tuple(ARCHS)


def test_classification_amp_defaults_to_auto() -> None:
    assert ClassificationConfig().train.amp == "auto"
    for path in sorted((REPO / "configs" / "classification").glob("*.yaml")):
        assert load_config(path).train.amp == "auto", path.name


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
