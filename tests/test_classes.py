"""One class resolver: resolve_classes finds K, the names and the category ids by one documented rule."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from detkit.config import ConfigError, load_config
from detkit.data.classes import ClassInfo, resolve_classes
from detkit.data.coco import DatasetError, load_coco
from detkit.data.synthetic import make_shapes_coco

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "configs" / "demo" / "shapes_mask_rcnn_R_18_FPN.yaml"
PLAIN = ["data.synthetic=null"]


def _coco(path: Path, cats: list[tuple[int, str]]) -> Path:
    path.write_text(json.dumps({"images": [], "annotations": [], "categories": [{"id": i, "name": n} for i, n in cats]}))
    return path


def test_recorded_names_and_ids_come_first(tmp_path: Path) -> None:
    ann = _coco(tmp_path / "a.json", [(5, "x")])
    cfg = load_config(DEMO, PLAIN + ["data.class_names=[cat,dog]", "data.category_ids=[17,18]",
                                     f"data.train.annotations={ann}"])
    info = resolve_classes(cfg)
    assert info == ClassInfo(["cat", "dog"], [17, 18], "data.class_names") and info.num_classes == 2


def test_annotation_categories_in_id_order_train_then_val(tmp_path: Path) -> None:
    val = _coco(tmp_path / "val.json", [(90, "zebra"), (3, "car"), (1, "person")])
    cfg = load_config(DEMO, PLAIN + [f"data.train.annotations={tmp_path / 'absent.json'}", f"data.val.annotations={val}"])
    info = resolve_classes(cfg)
    assert info.names == ["person", "car", "zebra"] and info.category_ids == [1, 3, 90]
    assert "data.val.annotations" in info.source


def test_synthetic_set_and_count_only() -> None:
    info = resolve_classes(load_config(DEMO))
    assert info.names == ["circle", "rectangle", "triangle", "star"] and info.category_ids == [1, 3, 7, 9]
    only = resolve_classes(load_config(DEMO, PLAIN + ["model.num_classes=3"]))
    assert only.names == ["class_0", "class_1", "class_2"] and only.category_ids is None


def test_disagreement_and_nothing_known_are_one_line_config_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"model.num_classes=5 but data.class_names names 2 classes \(a, b\)"):
        resolve_classes(load_config(DEMO, PLAIN + ["data.class_names=[a,b]", "model.num_classes=5"]))
    with pytest.raises(ConfigError, match="set model.num_classes=K or data.class_names"):
        resolve_classes(load_config(DEMO, PLAIN))
    with pytest.raises(ConfigError, match="data.category_ids has 1 ids but data.class_names names 2"):
        resolve_classes(load_config(DEMO, PLAIN + ["data.class_names=[a,b]", "data.category_ids=[4]"]))
    with pytest.raises(ConfigError, match="at least 1"):
        ClassInfo.from_count(0, "--num-classes")


def test_unreadable_annotations_name_the_file(tmp_path: Path) -> None:
    bad = tmp_path / "broken.json"
    bad.write_text("{not json")
    with pytest.raises(DatasetError) as err:
        resolve_classes(load_config(DEMO, PLAIN + [f"data.train.annotations={bad}"]))
    assert str(bad) in str(err.value) and "\n" not in str(err.value)


def test_loaded_training_data_decides_and_model_num_classes_must_agree(tmp_path: Path) -> None:
    shapes = make_shapes_coco(tmp_path / "shapes", num_train=2, num_val=1, image_size=64, seed=0)
    data = load_coco(shapes["train_annotations"], shapes["train_images"], filter_empty=True, is_train=True)
    cfg = load_config(DEMO, PLAIN + ["data.class_names=[a,b,c,d]"])  # a re-used run config: the data decides
    assert resolve_classes(cfg, data).names == ["circle", "rectangle", "triangle", "star"]
    with pytest.raises(ConfigError, match="model.num_classes=2 but .*train.json names 4 classes"):
        resolve_classes(load_config(DEMO, PLAIN + ["model.num_classes=2"]), data)
