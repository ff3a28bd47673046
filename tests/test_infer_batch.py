"""tools/infer.py's throughput mode (--batch-size): batches of images per model call give the
records of one-image calls on same-size images, mixed sizes work image by image, a stopped batched
run resumes, and the images read ahead on a thread come in input order."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import cv2
import numpy as np
import pycocotools.mask as mask_util
import pytest
import torch
from tiny_configs import TINY_MASK_RCNN

from detkit.errors import UsageError
from detkit.inference.runner import InferOptions, run_inference
from detkit.inference.inputs import read_images
from detkit.inference.parts import parts_dir_for
from detkit.models.detector import TwoStageDetector

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.filterwarnings("ignore::DeprecationWarning")]

REPO = Path(__file__).resolve().parents[1]
TOOL = REPO / "tools" / "infer.py"

SIZES = {"same": [(96, 128)] * 5, "mixed": [(96, 128), (112, 96), (64, 128), (96, 128), (128, 80)]}


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Config, random weights whose class scores vary with the image, a folder of same-size and
    one of mixed-size images (a broken file in the middle of the mixed one)."""
    from detkit.config import load_config
    from detkit.models.build import build_detector

    root = tmp_path_factory.mktemp("batch")
    cfg_path = root / "tiny.yaml"
    cfg_path.write_text(TINY_MASK_RCNN, encoding="utf-8")
    torch.manual_seed(0)
    model = build_detector(load_config(cfg_path), 3)
    with torch.no_grad():
        model.roi_heads.box_predictor.cls_score.bias.copy_(torch.tensor([2.0, 1.0, 0.0, -6.0]))  # background last
    weights = root / "random.pth"
    torch.save(model.state_dict(), weights)
    rng = np.random.default_rng(0)
    out = {"root": root, "config": cfg_path, "weights": weights}
    for kind, sizes in SIZES.items():
        folder = root / kind
        folder.mkdir()
        for i, (h, w) in enumerate(sizes):
            img = cv2.GaussianBlur(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), (5, 5), 0)
            cv2.imwrite(str(folder / f"img{i}.png"), img)
        out[kind] = folder
    (out["mixed"] / "img2b.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")  # sorted between img2 and img3
    return out


def _options(setup: dict[str, Path], kind: str, out: Path, **kwargs) -> InferOptions:
    return InferOptions(config=str(setup["config"]), weights=str(setup["weights"]), input=str(setup[kind]),
                        save_json=str(out / "res.json"), output=str(out / "drawn"), score_thresh=0.0, **kwargs)


@pytest.fixture()
def model_calls(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The number of images of each model call."""
    calls: list[int] = []
    original = TwoStageDetector.predict

    def predict(self: TwoStageDetector, images, paste_masks: bool = True):
        calls.append(len(images))
        return original(self, images, paste_masks=paste_masks)

    monkeypatch.setattr(TwoStageDetector, "predict", predict)
    return calls


def _run(opts: InferOptions) -> list[dict]:
    returned = run_inference(opts)
    records = json.loads(Path(opts.save_json).read_text(encoding="utf-8"))
    assert records == returned and records
    return records


def assert_same_records(got: list[dict], want: list[dict]) -> None:
    """The same detections image by image: each record of ``want`` pairs with one of ``got`` of the
    same image, ids and label, bbox within 0.011 px (the JSON's 0.01 px rounding), score within 2e-5,
    and nearly the same mask (order within an image may differ where scores tie)."""
    key = ("image_id", "file_name", "category_id", "label")
    assert sorted(tuple(r[k] for k in key) for r in got) == sorted(tuple(r[k] for k in key) for r in want)
    left = list(got)
    for w in want:
        pair = next((g for g in left if all(g[k] == w[k] for k in key)
                     and np.allclose(g["bbox"], w["bbox"], atol=0.011) and abs(g["score"] - w["score"]) <= 2e-5),
                    None)
        assert pair is not None, f"no batched record matches {w['file_name']} {w['bbox']} {w['score']}"
        left.remove(pair)
        mg, mw = (mask_util.decode(r["segmentation"]).astype(bool) for r in (pair, w))
        assert mg.shape == mw.shape and (mg != mw).sum() <= max(2, 0.01 * mw.sum())


def test_batch_of_same_size_images_gives_the_records_of_one_image_calls(
        setup: dict[str, Path], tmp_path: Path, model_calls: list[int], capsys: pytest.CaptureFixture) -> None:
    one = _run(_options(setup, "same", tmp_path / "one"))
    assert model_calls == [1] * 5
    model_calls.clear()
    capsys.readouterr()
    two = _run(_options(setup, "same", tmp_path / "two", batch_size=2))
    assert model_calls == [2, 2, 1]  # really batched: 5 images in 3 model calls
    out = capsys.readouterr().out
    progress = [ln.split(":")[0] for ln in out.splitlines() if ln.endswith(" detections")]
    assert progress == [f"img{i}.png" for i in range(5)]
    assert "5 images, " in out and "(batch size 2)" in out
    assert_same_records(two, one)
    assert [r["file_name"] for r in two] == [r["file_name"] for r in one]  # input order
    for i in range(5):  # every image drawn, at its own size
        drawn = cv2.imread(str(tmp_path / "two" / "drawn" / f"img{i}.png"))
        assert drawn.shape[:2] == SIZES["same"][i]
        np.testing.assert_array_equal(drawn, cv2.imread(str(tmp_path / "one" / "drawn" / f"img{i}.png")))


def test_batch_of_mixed_sizes_with_an_unreadable_file(setup: dict[str, Path], tmp_path: Path,
                                                      model_calls: list[int], capsys: pytest.CaptureFixture) -> None:
    records = _run(_options(setup, "mixed", tmp_path, batch_size=3))
    # the broken file takes no place in a batch, and a model call holds one size only: [3, 2] images
    # in two Predictor.predict calls, of 3 and 2 sizes after resizing
    assert sorted(model_calls) == [1] * 5
    captured = capsys.readouterr()
    assert "skipping" in captured.err and "img2b.png" in captured.err and "skipped 1 unreadable" in captured.err
    progress = [ln.split(":")[0] for ln in captured.out.splitlines() if ln.endswith(" detections")]
    assert progress == [f"img{i}.png" for i in range(5)]
    assert [r["image_id"] for r in records] == sorted(r["image_id"] for r in records)  # merged in input order
    names = sorted((setup["mixed"]).glob("img*.png"))
    assert {r["file_name"]: r["image_id"] for r in records} == {
        f.name: i for i, f in enumerate(names) if f.name != "img2b.png"}  # ids: positions in the listing
    for r in records:  # boxes and masks in each image's own pixels
        h, w = SIZES["mixed"][int(r["file_name"][3])]
        assert mask_util.decode(r["segmentation"]).shape == (h, w)
        x, y, bw, bh = r["bbox"]
        assert 0 <= x and 0 <= y and x + bw <= w + 0.01 and y + bh <= h + 0.01
    for i, size in enumerate(SIZES["mixed"]):
        assert cv2.imread(str(tmp_path / "drawn" / f"img{i}.png")).shape[:2] == size
    capsys.readouterr()
    assert_same_records(records, _run(_options(setup, "mixed", tmp_path / "one")))  # exactly batch 1's


def test_predictor_batches_group_images_by_size(setup: dict[str, Path], model_calls: list[int]) -> None:
    from detkit import Predictor
    from detkit.config import load_config

    cfg = load_config(setup["config"])
    cfg.test.batch_size = 2
    predictor = Predictor(cfg, weights=str(setup["weights"]))
    rng = np.random.default_rng(0)
    images = [(rng.random((h, w, 3)) * 255).astype(np.uint8) for h, w in [(96, 128), (64, 200), (96, 128),
                                                                        (96, 128), (64, 200)]]
    batched = predictor.predict(images)
    assert sorted(model_calls) == [1, 2, 2]  # (96, 128) x 3 -> 2 + 1, (64, 200) x 2 -> 2
    for image, got in zip(images, batched):
        want = predictor(image)
        np.testing.assert_array_equal(got.labels, want.labels)
        np.testing.assert_allclose(got.boxes, want.boxes, atol=1e-3)
        np.testing.assert_allclose(got.scores, want.scores, atol=1e-5)


def test_a_stopped_batched_run_resumes(setup: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                       capsys: pytest.CaptureFixture) -> None:
    reference = _run(_options(setup, "same", tmp_path / "ref", batch_size=2))
    calls: list[int] = []
    original = TwoStageDetector.predict

    def stop_on_second_call(self: TwoStageDetector, images, paste_masks: bool = True):
        if len(calls) == 1:
            raise KeyboardInterrupt
        calls.append(len(images))
        return original(self, images, paste_masks=paste_masks)

    opts = _options(setup, "same", tmp_path / "run", batch_size=2)
    monkeypatch.setattr(TwoStageDetector, "predict", stop_on_second_call)
    with pytest.raises(KeyboardInterrupt):
        run_inference(opts)
    monkeypatch.undo()
    lines = [json.loads(s) for p in parts_dir_for(opts.save_json).glob("*.jsonl")
             for s in p.read_text(encoding="utf-8").splitlines()]
    assert sorted(ln["index"] for ln in lines) == [0, 1]  # the first batch's images were written one by one
    capsys.readouterr()

    counted: list[int] = []
    monkeypatch.setattr(TwoStageDetector, "predict",
                        lambda self, images, paste_masks=True: counted.append(len(images)) or original(
                            self, images, paste_masks=paste_masks))
    resumed = run_inference(replace(opts, resume=True))
    assert counted == [2, 1] and "2 of 5 images were done" in capsys.readouterr().out
    assert_same_records(resumed, reference)
    assert not parts_dir_for(opts.save_json).exists()

    # another batch size is another setting: a stopped run at batch 2 is not resumed at batch 1
    stopped = replace(opts, save_json=str(tmp_path / "c.json"))
    monkeypatch.setattr(TwoStageDetector, "predict", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt):
        run_inference(stopped)
    monkeypatch.undo()
    with pytest.raises(UsageError, match="test.batch_size"):
        run_inference(replace(stopped, batch_size=1, resume=True))


def test_images_read_ahead_come_in_order_with_errors_in_place(tmp_path: Path) -> None:
    files = []
    for i in range(7):
        f = tmp_path / f"{i}.png"
        if i == 3:
            f.write_bytes(b"broken")
        else:
            cv2.imwrite(str(f), np.full((8 + i, 9, 3), i, np.uint8))
        files.append(f)
    for ahead in (0, 1, 3, 10):
        got = list(read_images(files, ahead))
        assert [r.index for r in got] == list(range(7)) and [r.path for r in got] == files
        assert got[3].image is None and "3.png" in got[3].error
        assert all(r.image.shape == (8 + r.index, 9, 3) and (r.image == r.index).all() for r in got if r.index != 3)
    reader = read_images(files, 2)
    assert next(reader).index == 0
    reader.close()  # stops early without waiting for the rest


def test_batch_size_flag(setup: dict[str, Path], tmp_path: Path) -> None:
    r = subprocess.run([sys.executable, str(TOOL), "--config", str(setup["config"]), "--input", str(setup["same"]),
                        "--batch-size", "0"], capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert r.returncode == 2 and "--batch-size" in r.stderr and "1 or more" in r.stderr
    help_text = subprocess.run([sys.executable, str(TOOL), "--help"], capture_output=True, text=True, timeout=60).stdout
    assert "--batch-size N" in help_text and "padded" in help_text
    with pytest.raises(UsageError, match="--batch-size 0"):
        run_inference(_options(setup, "same", tmp_path, batch_size=0))
