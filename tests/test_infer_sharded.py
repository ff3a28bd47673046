"""tools/infer.py split over processes and resumed: two torchrun processes (gloo, CPU) write the
results file of one process, a stopped run continues with --resume without predicting its finished
images again, and parts of another run or other settings are refused with one line."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Callable

import cv2
import numpy as np
import pycocotools.mask as mask_util
import pytest
import torch
import torch.distributed as dist
from tiny_configs import TINY_MASK_RCNN

from detkit.cli import run_cli
from detkit.errors import UsageError
from detkit.inference.runner import InferOptions, run_inference
from detkit.inference.parts import (
    MANIFEST,
    PartWriter,
    merge_parts,
    part_path,
    parts_dir_for,
    prepare_parts,
    read_parts,
    shard_indices,
)
from detkit.inference.predictor import Predictor

pytestmark = pytest.mark.usefixtures("one_thread")

REPO = Path(__file__).resolve().parents[1]
TOOL = REPO / "tools" / "infer.py"
NUM_IMAGES = 7
STOP_AFTER = 3  # the stopped run finishes this many images


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Config, random weights whose class scores vary with the image (every image has detections),
    and NUM_IMAGES generated images of a few sizes."""
    from detkit.config import load_config
    from detkit.models.build import build_detector

    root = tmp_path_factory.mktemp("sharded")
    cfg_path = root / "tiny.yaml"
    cfg_path.write_text(TINY_MASK_RCNN, encoding="utf-8")
    torch.manual_seed(0)
    model = build_detector(load_config(cfg_path), 3)
    with torch.no_grad():
        model.roi_heads.box_predictor.cls_score.bias.copy_(torch.tensor([2.0, 1.0, 0.0, -6.0]))  # background last
    weights = root / "random.pth"
    torch.save(model.state_dict(), weights)
    rng = np.random.default_rng(0)
    images = root / "images"
    images.mkdir()
    for i in range(NUM_IMAGES):
        h, w = (96, 128) if i % 2 == 0 else (112, 96)
        cv2.imwrite(str(images / f"img{i}.png"), rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
    return {"root": root, "config": cfg_path, "weights": weights, "images": images}


def _options(setup: dict[str, Path], save_json: Path, **kwargs) -> InferOptions:
    return InferOptions(config=str(setup["config"]), weights=str(setup["weights"]), input=str(setup["images"]),
                        save_json=str(save_json), score_thresh=kwargs.pop("score_thresh", 0.0), **kwargs)


@pytest.fixture(scope="module")
def reference(setup: dict[str, Path], one_thread_module: None) -> list[dict]:
    """The records of one uninterrupted process."""
    path = setup["root"] / "reference.json"
    returned = run_inference(_options(setup, path))
    records = json.loads(path.read_text(encoding="utf-8"))
    assert records == returned and not parts_dir_for(path).exists()
    assert {r["file_name"] for r in records} == {f"img{i}.png" for i in range(NUM_IMAGES)}
    return records


def _by_image(records: list[dict]) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for r in records:
        out.setdefault(r["file_name"], []).append(r)
    return out


def assert_same_records(got: list[dict], want: list[dict]) -> None:
    """Same records in the same order; bbox and score within float (and 0.01 px rounding) tolerance,
    masks nearly identical."""
    key = ("image_id", "file_name", "category_id", "label", "category_name")
    assert [tuple(r[k] for k in key) for r in got] == [tuple(r[k] for k in key) for r in want]
    for g, w in zip(got, want):
        np.testing.assert_allclose(g["bbox"], w["bbox"], atol=0.011)
        assert g["score"] == pytest.approx(w["score"], abs=2e-5)
        mg, mw = (mask_util.decode(r["segmentation"]).astype(bool) for r in (g, w))
        assert mg.shape == mw.shape and (mg != mw).sum() <= max(2, 0.01 * mw.sum())


def _torchrun(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(TOOL), *args]
    env = dict(os.environ, OMP_NUM_THREADS="1")  # 2 processes share the cores
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240, cwd=cwd, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc


def _progress(stdout: str) -> list[tuple[str, str]]:
    """(rank, image name) of each progress line of a 2-process run."""
    return re.findall(r"\[rank (\d)/2\] (img\d+\.png): \d+ detections", stdout)


def _counting_predictor(monkeypatch: pytest.MonkeyPatch, stop_after: int = -1) -> list[int]:
    """Count Predictor calls (the list's length); with ``stop_after`` >= 0, the call after that many
    raises KeyboardInterrupt, as Ctrl-C would."""
    calls: list[int] = []
    original: Callable = Predictor.__call__

    def call(self: Predictor, image: np.ndarray):
        if len(calls) == stop_after:
            raise KeyboardInterrupt
        calls.append(1)
        return original(self, image)

    monkeypatch.setattr(Predictor, "__call__", call)
    return calls


def _stopped_run(setup: dict[str, Path], save_json: Path, monkeypatch: pytest.MonkeyPatch) -> list[dict]:
    """A run stopped after STOP_AFTER images, whose part file then gets a planted record for image 1
    (so a prediction of it again would show) and a half-written line for image 3. Returns the
    planted records."""
    _counting_predictor(monkeypatch, stop_after=STOP_AFTER)
    with pytest.raises(KeyboardInterrupt):
        run_inference(_options(setup, save_json))
    monkeypatch.undo()
    parts = parts_dir_for(save_json)
    assert not save_json.exists() and (parts / MANIFEST).is_file()
    part_files = list(parts.glob("*.jsonl"))
    assert len(part_files) == 1
    lines = [json.loads(s) for s in part_files[0].read_text(encoding="utf-8").splitlines()]
    assert [(ln["index"], ln["file"]) for ln in lines] == [(i, f"img{i}.png") for i in range(STOP_AFTER)]
    planted = [dict(lines[1]["records"][0], bbox=[1.0, 2.0, 3.0, 4.0], score=0.12345)]
    lines[1]["records"] = planted
    half = json.dumps({"index": 3, "file": "img3.png", "records": [{"image_id": 3}]})[:30]
    part_files[0].write_text("".join(json.dumps(ln) + "\n" for ln in lines) + half, encoding="utf-8")
    return planted


def _expected_after_resume(reference: list[dict], planted: list[dict]) -> list[dict]:
    by_image = _by_image(reference)
    by_image["img1.png"] = planted
    return [r for i in range(NUM_IMAGES) for r in by_image.get(f"img{i}.png", [])]


# --------------------------------------------------------------------------- shards
def test_shard_indices_cover_every_index_once() -> None:
    for n in range(0, 14):
        indices = [i for i in range(2 * n) if i % 2 == 0 or i % 3 == 0][:n]  # not 0..n-1: what a resume leaves
        for world in range(1, 6):
            shards = [shard_indices(indices, r, world) for r in range(world)]
            assert [i for s in shards for i in s] == indices  # each index once, in input order
            assert max(map(len, shards)) - min(map(len, shards)) <= 1
    with pytest.raises(ValueError, match="rank 2"):
        shard_indices([1, 2], 2, 2)


def test_parts_merge_in_input_order(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    names = [f"im{i}.jpg" for i in range(5)]
    parts = tmp_path / "res.json.parts"
    settings = {"--score-thresh": 0.5}
    assert prepare_parts(parts, settings, names, resume=False).run == 1
    # two processes of run 1 finished images 3, 1 and 0, 2 (each in its own order)
    with PartWriter(part_path(parts, 1, 0)) as w0, PartWriter(part_path(parts, 1, 1)) as w1:
        w0.write(3, "im3.jpg", [{"image_id": 3, "k": "a"}, {"image_id": 3, "k": "b"}])
        w1.write(0, "im0.jpg", [{"image_id": 0}])
        w0.write(1, "im1.jpg", [])
        w1.write(2, "im2.jpg", [{"image_id": 2}])
    with open(part_path(parts, 1, 1), "a", encoding="utf-8") as f:
        f.write('{"index": 4, "file": "im4.jpg", "rec')  # stopped mid-write
    plan = prepare_parts(parts, settings, names, resume=True)
    assert plan.run == 2 and plan.done == [0, 1, 2, 3]
    assert "ignoring line 3, which is incomplete" in capsys.readouterr().err
    records, finished = merge_parts(parts, names)
    assert finished == 4 and [(r["image_id"], r.get("k")) for r in records] == [
        (0, None), (2, None), (3, "a"), (3, "b")]
    with pytest.raises(UsageError, match="differs from the stopped run"):
        prepare_parts(parts, {"--score-thresh": 0.25}, names, resume=True)
    with pytest.raises(UsageError, match="records im3.jpg as image 3 of --input, which is im9.jpg now"):
        read_parts(parts, names[:3] + ["im9.jpg", "im4.jpg"])
    (parts / MANIFEST).unlink()
    with pytest.raises(UsageError, match="missing or unreadable"):
        prepare_parts(parts, settings, names, resume=True)


# --------------------------------------------------------------------------- torchrun
@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="no torch.distributed gloo")
@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # pycocotools' decode under numpy 2
def test_two_processes_write_the_results_of_one(setup: dict[str, Path], reference: list[dict],
                                                tmp_path: Path) -> None:
    out = tmp_path / "res.json"
    proc = _torchrun(["--config", str(setup["config"]), "--weights", str(setup["weights"]), "--input",
                      str(setup["images"]), "--output", str(tmp_path / "drawn"), "--score-thresh", "0",
                      "--save-json", str(out)], tmp_path)
    assert_same_records(json.loads(out.read_text(encoding="utf-8")), reference)
    assert not parts_dir_for(out).exists()  # merged, then removed
    # every image predicted exactly once, by one of the two processes; the summary printed once
    progress = _progress(proc.stdout)
    assert sorted(name for _, name in progress) == [f"img{i}.png" for i in range(NUM_IMAGES)], proc.stdout
    assert {rank for rank, _ in progress} == {"0", "1"}
    assert proc.stdout.count("wrote ") == 1 and proc.stdout.count("drawn output in") == 1
    assert sorted(p.name for p in (tmp_path / "drawn").iterdir()) == sorted(f"img{i}.png" for i in range(NUM_IMAGES))


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="no torch.distributed gloo")
@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_two_processes_resume_a_stopped_single_process_run(setup: dict[str, Path], reference: list[dict],
                                                           tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "res.json"
    planted = _stopped_run(setup, out, monkeypatch)
    args = ["--config", str(setup["config"]), "--weights", str(setup["weights"]), "--input", str(setup["images"]),
            "--score-thresh", "0", "--save-json", str(out)]
    proc = _torchrun(args + ["--resume"], tmp_path)
    assert_same_records(json.loads(out.read_text(encoding="utf-8")), _expected_after_resume(reference, planted))
    assert not parts_dir_for(out).exists()
    progress = _progress(proc.stdout)
    assert sorted(name for _, name in progress) == [f"img{i}.png" for i in range(STOP_AFTER, NUM_IMAGES)], \
        proc.stdout  # the finished ones are not predicted again; the rest is split over both processes
    assert {rank for rank, _ in progress} == {"0", "1"}
    assert proc.stderr.count("ignoring line 4") == 1  # the half-written line: img3 predicted again


# --------------------------------------------------------------------------- one process
@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_resume_skips_finished_images(setup: dict[str, Path], reference: list[dict], tmp_path: Path,
                                      monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "res.json"
    planted = _stopped_run(setup, out, monkeypatch)
    capsys.readouterr()
    calls = _counting_predictor(monkeypatch)
    returned = run_inference(_options(setup, out, resume=True))
    captured = capsys.readouterr()
    assert len(calls) == NUM_IMAGES - STOP_AFTER  # image 3 again (its line was cut), the first three not
    assert f"{STOP_AFTER} of {NUM_IMAGES} images were done" in captured.out
    assert captured.err.count("ignoring line 4, which is incomplete") == 1  # warned once, not again at the merge
    records = json.loads(out.read_text(encoding="utf-8"))
    assert records == returned
    assert_same_records(records, _expected_after_resume(reference, planted))
    assert _by_image(records)["img1.png"] == planted  # carried over from the part file, not recomputed
    assert not parts_dir_for(out).exists()

    # --resume with nothing to resume starts from the first image
    fresh = tmp_path / "fresh.json"
    calls.clear()
    run_inference(_options(setup, fresh, resume=True))
    assert len(calls) == NUM_IMAGES and "starting from the first image" in capsys.readouterr().err
    assert_same_records(json.loads(fresh.read_text(encoding="utf-8")), reference)


def test_merge_keeps_the_parts_when_finished_images_are_missing(setup: dict[str, Path], reference: list[dict],
                                                                tmp_path: Path, monkeypatch) -> None:
    """A finished image whose line never reaches the parts folder (its process wrote elsewhere, e.g. a node
    without the shared folder) stops the merge in one line naming it; the parts stay, and --resume (after
    the lost image is predicted again) writes the whole results file."""
    from detkit.inference.parts import PartsMissing

    out = tmp_path / "res.json"
    real_write = PartWriter.write

    def lose_img3(self, index: int, file_name: str, records: list[dict]) -> None:
        if file_name != "img3.png":
            real_write(self, index, file_name, records)

    monkeypatch.setattr(PartWriter, "write", lose_img3)
    with pytest.raises(PartsMissing) as e:
        run_inference(_options(setup, out))
    msg = str(e.value)
    assert "\n" not in msg and "img3.png" in msg and "rank 0" in msg and f"hold {NUM_IMAGES - 1} of the {NUM_IMAGES}" in msg
    assert not out.exists() and len(read_parts(parts_dir_for(out), sorted(p.name for p in setup["images"].iterdir()))) \
        == NUM_IMAGES - 1  # nothing deleted
    monkeypatch.setattr(PartWriter, "write", real_write)
    assert_same_records(run_inference(_options(setup, out, resume=True)), reference)
    assert not parts_dir_for(out).exists()


def test_merge_parts_refuses_a_mismatch_with_the_finished_images(tmp_path: Path) -> None:
    from detkit.inference.parts import PartsMissing

    names = ["a.jpg", "b.jpg", "c.jpg"]
    parts = tmp_path / "r.json.parts"
    prepare_parts(parts, {}, names, resume=False)
    with PartWriter(part_path(parts, 1, 0)) as w:
        w.write(0, "a.jpg", [{"image_id": 0}])
        w.write(2, "c.jpg", [])
    assert merge_parts(parts, names, {0: "rank 0", 2: "rank 0"})[1] == 2
    with pytest.raises(PartsMissing, match=r"records of 1 \(b.jpg\), finished by rank 1"):
        merge_parts(parts, names, {0: "rank 0", 1: "rank 1", 2: "rank 0"})
    with pytest.raises(PartsMissing, match="no process reported finished"):
        merge_parts(parts, names, {0: "rank 0"})


def _one_line_error(opts: InferOptions, capsys: pytest.CaptureFixture) -> str:
    assert run_cli(lambda argv: run_inference(opts), [], prog="infer.py") == 2
    err = capsys.readouterr().err
    assert err.startswith("infer.py: error: ") and err.count("\n") == 1, err
    return err


def test_parts_of_another_run_or_settings_are_refused(setup: dict[str, Path], tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch,
                                                      capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "res.json"
    _stopped_run(setup, out, monkeypatch)
    parts = parts_dir_for(out)
    before = {p.name: p.read_bytes() for p in parts.iterdir()}
    capsys.readouterr()
    err = _one_line_error(_options(setup, out), capsys)
    assert str(parts) in err and "pass --resume" in err
    err = _one_line_error(_options(setup, out, resume=True, score_thresh=0.3), capsys)
    assert "--score-thresh (0.0 then, 0.3 now)" in err
    err = _one_line_error(_options(setup, out, resume=True, overrides=("model.roi_heads.nms_thresh_test=0.3",)),
                          capsys)
    assert "config model.roi_heads.nms_thresh_test (0.5 then, 0.3 now)" in err
    other = setup["root"] / "other.pth"
    state = torch.load(setup["weights"], weights_only=True)
    torch.save({k: v + 1 if v.is_floating_point() else v for k, v in state.items()}, other)
    err = _one_line_error(InferOptions(config=str(setup["config"]), weights=str(other), input=str(setup["images"]),
                                       save_json=str(out), score_thresh=0.0, resume=True), capsys)
    assert "--weights" in err and "other.pth" in err
    assert {p.name: p.read_bytes() for p in parts.iterdir()} == before  # nothing mixed into the stopped run
    assert not out.exists()

    err = _one_line_error(InferOptions(config=str(setup["config"]), input=str(setup["images"]), resume=True), capsys)
    assert "--resume" in err and "--save-json" in err


def test_video_is_not_split_over_processes(setup: dict[str, Path], tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    clip = tmp_path / "clip.mp4"
    clip.write_bytes(b"not decoded: refused before")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(UsageError, match="not split over processes"):
        run_inference(InferOptions(config=str(setup["config"]), input=str(clip)))
    assert not dist.is_initialized()
