"""Two-process torchrun runs (gloo, CPU): pretrain_cls, train_det and eval_det finish and report once, and
two processes with one image each compute the same SGD updates as one process with both images."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Optional

import pytest
import torch
import torch.distributed as dist

from detkit.checkpoint import load_checkpoint
from detkit.config import DetectionConfig
from detkit.data.synthetic import make_shapes_coco, make_shapes_imagefolder
from detkit.engine import Trainer, build_sgd
from detkit.engine.detection import build_model
from detkit.engine.distributed import get_rank, get_world_size, init_distributed, unwrap_model
from detkit.models.build import build_detector
from detkit.structures import Batch, Targets

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="torch.distributed with the gloo backend is not available")

TINY_DET = [
    "model.fpn.out_channels=32", "model.rpn.pre_nms_topk_train=200", "model.rpn.post_nms_topk_train=100",
    "model.rpn.pre_nms_topk_test=100", "model.rpn.post_nms_topk_test=30", "model.rpn.batch_size_per_image=64",
    "model.roi_heads.batch_size_per_image=32", "model.roi_heads.box_head.fc_dim=64",
    "model.roi_heads.mask_head.conv_dim=16", "model.roi_heads.mask_head.num_conv=1",
    "input.min_size_train=96", "input.max_size_train=128", "input.min_size_test=96", "input.max_size_test=128",
    "dataloader.num_workers=0", "train.num_vis_images=0", "model.roi_heads.score_thresh_test=0.0",
]


def _torchrun(tool: str, args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return _torchrun_script(ROOT / "tools" / tool, args, cwd)


def _torchrun_script(script: Path, args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(script)] + args
    env = dict(os.environ, OMP_NUM_THREADS="1")  # 2 processes share the cores
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=cwd, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc


def test_pretrain_cls_two_processes(tmp_path: Path) -> None:
    paths = make_shapes_imagefolder(tmp_path / "data", num_per_class_train=4, num_per_class_val=3, image_size=32)
    out = tmp_path / "run"
    proc = _torchrun("pretrain_cls.py", [
        "--config", str(ROOT / "configs" / "classification" / "shapes_resnet18.yaml"), "--output-dir", str(out),
        f"data.train={paths['train']}", f"data.val={paths['val']}", "data.synthetic=null", "input.size=32",
        "train.batch_size=8", "train.epochs=1", "dataloader.num_workers=0", "train.warmup_epochs=0",
    ], tmp_path)
    assert proc.stdout.count("top1 ") == 1  # the summary is printed by rank 0 only
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics) >= {"top1", "top5"}
    # 12 val images split over 2 ranks and counted once: accuracy is a multiple of 1/12
    assert abs(metrics["top1"] * 12 / 100 - round(metrics["top1"] * 12 / 100)) < 1e-6
    ck = load_checkpoint(out / "checkpoints" / "last.pth")
    assert ck["iteration"] == 2 and ck["epoch"] == 1  # 16 images / (4 per rank x 2 ranks)
    assert len(ck["rng_states"]) == 2
    assert (out / "log.txt").read_text().count("Output folder") == 1


def test_train_det_and_eval_det_two_processes(tmp_path: Path) -> None:
    paths = make_shapes_coco(tmp_path / "data", num_train=4, num_val=3, image_size=96, seed=5)
    data = ["data.synthetic=null",
            f"data.train.annotations={paths['train_annotations']}", f"data.train.images={paths['train_images']}",
            f"data.val.annotations={paths['val_annotations']}", f"data.val.images={paths['val_images']}"]
    cfg = str(ROOT / "configs" / "demo" / "shapes_mask_rcnn_R_18_FPN.yaml")
    out = tmp_path / "run"
    proc = _torchrun("train_det.py", ["--config", cfg, "--output-dir", str(out), *TINY_DET, *data,
                                      "train.max_iters=2", "train.batch_size=2", "train.checkpoint_period=1",
                                      "train.log_period=1", "train.warmup_iters=1", "train.sync_bn=true"], tmp_path)
    assert proc.stdout.count("Average Precision  (AP) @[ IoU=0.50:0.95 | area=   all | maxDets=100 ]") == 2
    metrics = json.loads((out / "metrics.json").read_text())
    assert "bbox/AP" in metrics and "segm/AP" in metrics
    records = [json.loads(s) for s in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["iter"] for r in records if "total_loss" in r] == [1, 2]
    evals = [r for r in records if "bbox/AP" in r]  # the final evaluation, logged once (rank 0)
    assert len(evals) == 1 and evals[0]["iter"] == 2 and evals[0]["segm/AP"] == metrics["segm/AP"]
    assert (out / "log.txt").read_text().count("Output folder") == 1
    ck = load_checkpoint(out / "checkpoints" / "last.pth")
    assert ck["iteration"] == 2 and len(ck["rng_states"]) == 2
    assert not any(k.startswith("module.") for k in ck["model"])  # saved unwrapped from DDP

    ev = tmp_path / "eval"
    proc = _torchrun("eval_det.py", ["--config", cfg, "--weights", str(out / "checkpoints" / "last.pth"),
                                     "--output-dir", str(ev), *TINY_DET, *data], tmp_path)
    ev_metrics = json.loads((ev / "metrics.json").read_text())
    results = json.loads((ev / "results.json").read_text())
    # every val image's results were gathered from both ranks into one file
    assert {r["image_id"] for r in results} == {1, 2, 3}
    assert ev_metrics["bbox/AP"] == pytest.approx(metrics["bbox/AP"], abs=1e-6)


# --------------------------------------------------------------------------- DDP = one big batch
# A Faster R-CNN R18-FPN (FrozenBN: no batch statistics, so a per-process batch does not change the
# math) whose losses decompose exactly over images:
#  * every anchor and every proposal is sampled (no random subset), and each image contributes the
#    same number of them: no IoU ignore band for anchors (iou_thresholds 0.5/0.5, no crowd boxes),
#    equal image sizes (same anchors, no padding difference), exactly post_nms_topk_train proposals
#    per image (plenty survive NMS) plus the same number of GT boxes per image.
#  * the RPN and RoI losses are normalized by the number of sampled anchors / RoIs over the batch,
#    so the 2-image loss is the mean of the 1-image losses, which DDP's gradient average reproduces.
EQ_STEPS = 2
EQ_SIZE = 64
EQ_CLASSES = 2


def _eq_cfg(weights: Optional[str]) -> DetectionConfig:
    cfg = DetectionConfig()
    m = cfg.model
    m.meta_architecture = "faster_rcnn"
    m.weights = weights
    m.backbone.name, m.backbone.norm, m.backbone.freeze_at = "resnet18", "FrozenBN", 0
    m.fpn.out_channels = 16
    m.anchors.sizes = [[16], [32], [64], [128], [256]]
    m.rpn.iou_thresholds = (0.5, 0.5)  # no ignored anchors
    # 1023 anchors per 64 x 64 image: all sampled
    m.rpn.batch_size_per_image, m.rpn.positive_fraction = 4096, 1.0
    m.rpn.pre_nms_topk_train, m.rpn.post_nms_topk_train = 1000, 40
    m.roi_heads.batch_size_per_image, m.roi_heads.positive_fraction = 256, 1.0  # 40 proposals + 2 GT: all
    m.roi_heads.box_head.fc_dim = 32
    cfg.train.base_lr, cfg.train.momentum, cfg.train.weight_decay = 0.02, 0.9, 1e-4
    return cfg


def _eq_scene(seed: int) -> tuple[torch.Tensor, Targets]:
    """Noise image with 2 flat-colored rectangles (classes 0 and 1) and their boxes."""
    g = torch.Generator().manual_seed(seed)
    img = torch.randint(0, 256, (3, EQ_SIZE, EQ_SIZE), generator=g, dtype=torch.uint8)
    boxes = []
    for _ in range(2):
        x0, y0 = (int(v) for v in torch.randint(0, EQ_SIZE // 2, (2,), generator=g))
        w, h = (int(v) for v in torch.randint(12, EQ_SIZE // 2, (2,), generator=g))
        img[:, y0 : y0 + h, x0 : x0 + w] = torch.randint(0, 256, (3, 1, 1), generator=g, dtype=torch.uint8)
        boxes.append([x0, y0, x0 + w, y0 + h])
    return img, Targets(boxes=torch.tensor(boxes, dtype=torch.float32), labels=torch.tensor([0, 1]))


def _eq_train(weights: Path, image_seeds: list[list[int]]) -> dict[str, torch.Tensor]:
    """``len(image_seeds)`` steps of the real training path (build_model: DDP under torchrun; build_sgd;
    Trainer.run_step) from ``weights``, step ``i`` on the images ``image_seeds[i]``; the final weights."""
    cfg = _eq_cfg(str(weights))
    device = torch.device("cpu")
    model = build_model(cfg, EQ_CLASSES, device)
    assert isinstance(model, torch.nn.parallel.DistributedDataParallel) == (get_world_size() > 1)
    t = cfg.train
    optimizer = build_sgd(model, t.base_lr, t.momentum, t.weight_decay, t.weight_decay_norm, t.weight_decay_bias)
    batches = []
    for seeds in image_seeds:
        scenes = [_eq_scene(s) for s in seeds]
        batches.append(Batch(images=[im for im, _ in scenes], targets=[tg for _, tg in scenes]))
    trainer = Trainer(model, optimizer, batches, max_iters=len(batches), device=device)
    trainer.train()
    return {k: v.detach().clone() for k, v in unwrap_model(model).state_dict().items()}


def _eq_worker(out: Path) -> None:
    """One torchrun process: rank r trains on image 2 * step + r alone; saves its final weights."""
    init_distributed(torch.device("cpu"))
    rank = get_rank()
    assert get_world_size() == 2
    state = _eq_train(out / "init.pth", [[2 * i + rank] for i in range(EQ_STEPS)])
    torch.save(state, out / f"rank{rank}.pth")
    dist.barrier()
    dist.destroy_process_group()


def _eq_check_proposal_counts(model: torch.nn.Module) -> None:
    """The setup's premise: every image yields exactly ``post_nms_topk_train`` proposals (so each image
    has the same number of RoIs, all of them sampled)."""
    model.train()
    with torch.no_grad():
        for seed in range(2 * EQ_STEPS):
            x, sizes = model.preprocess([_eq_scene(seed)[0]])
            proposals, _ = model.rpn(sizes, model.backbone(x), None)
            assert len(proposals[0]) == model.rpn.post_nms_topk[0], (seed, len(proposals[0]))


def test_two_processes_one_image_each_equal_one_process_two_images(tmp_path: Path, one_thread: None) -> None:
    torch.manual_seed(0)
    init = build_detector(_eq_cfg(None), EQ_CLASSES)
    w0 = {k: v.detach().clone() for k, v in init.state_dict().items()}
    torch.save(w0, tmp_path / "init.pth")
    _eq_check_proposal_counts(init)
    _torchrun_script(Path(__file__), ["--equivalence-worker", str(tmp_path)], tmp_path)

    ranks = [torch.load(tmp_path / f"rank{r}.pth", weights_only=True) for r in range(2)]
    ref = _eq_train(tmp_path / "init.pth", [[2 * i, 2 * i + 1] for i in range(EQ_STEPS)])  # one process, 2 images
    alone = _eq_train(tmp_path / "init.pth", [[2 * i] for i in range(EQ_STEPS)])  # rank 0's images, no all-reduce

    trainable = [n for n, p in init.named_parameters() if p.requires_grad]
    assert "backbone.bottom_up.stem.conv1.weight" in trainable  # the whole detector trains (freeze_at=0)
    for name in trainable:
        assert torch.equal(ranks[0][name], ranks[1][name]), name  # DDP keeps the replicas identical
    # compare the updates (weights - initial weights) tensor by tensor; float32 rounding of the weights
    # themselves (~1e-7 relative) bounds how closely small updates of large weights can agree
    rel_err, rel_alone = {}, {}
    for name in trainable:
        d_ref, d_ddp, d_alone = ref[name] - w0[name], ranks[0][name] - w0[name], alone[name] - w0[name]
        scale = float(d_ref.abs().max())
        assert scale > 0, f"{name} was not updated"
        tol = 1e-3 * scale + 1e-6 * float(w0[name].abs().max())
        rel_err[name] = float((d_ddp - d_ref).abs().max()) / tol
        rel_alone[name] = float((d_alone - d_ref).abs().max()) / scale
    worst = max(rel_err, key=rel_err.get)
    median_alone = sorted(rel_alone.values())[len(rel_alone) // 2]
    print(f"{len(trainable)} tensors after {EQ_STEPS} steps: DDP vs 2-image update, worst error / tolerance "
          f"{rel_err[worst]:.3f} ({worst}); 1-image vs 2-image update, median relative difference {median_alone:.2f}")
    assert rel_err[worst] <= 1.0, f"{worst}: DDP vs 2-image update differ by {rel_err[worst]:.1f}x the tolerance"
    # the comparison is sensitive: one image's update alone (what a rank computes without the gradient
    # all-reduce) is far from the 2-image update
    assert median_alone > 0.05, rel_alone


if __name__ == "__main__":  # the worker of the equivalence test, started by torchrun
    if sys.argv[1:2] == ["--equivalence-worker"]:
        _eq_worker(Path(sys.argv[2]))
    else:
        raise SystemExit(f"usage: torchrun --nproc_per_node 2 {sys.argv[0]} --equivalence-worker DIR")
