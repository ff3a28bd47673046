"""topk_accuracy and ClassificationMeter against hand-computed numbers."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from detkit.evaluation import ClassificationMeter, topk_accuracy

# rows ranked:     row0: 1 > 2 > 0   row1: 0 > 1 > 2   row2: 2 > 1 > 0   row3: 0 > 2 > 1
LOGITS = torch.tensor([[0.1, 0.7, 0.2], [0.5, 0.3, 0.2], [0.2, 0.3, 0.5], [0.6, 0.1, 0.3]])
TARGETS = torch.tensor([1, 1, 0, 2])
# top1 hits: row0 only -> 25 %; top2 hits: rows 0, 1, 3 -> 75 %; top5 is clipped to 3 classes -> 100 %


def test_topk_accuracy_hand_example() -> None:
    acc = topk_accuracy(LOGITS, TARGETS, ks=(1, 2, 5))
    assert acc == {"top1": 25.0, "top2": 75.0, "top5": 100.0}


def test_topk_accuracy_default_keys_and_errors() -> None:
    logits = torch.zeros(2, 10)
    logits[0, 3] = 1.0  # row 0 predicts 3 (correct)
    logits[1, 4] = 1.0  # row 1 predicts 4, target 9 is tied with the rest
    acc = topk_accuracy(logits, torch.tensor([3, 9]))
    assert set(acc) == {"top1", "top5"}
    assert acc["top1"] == 50.0
    with pytest.raises(ValueError, match="targets must be"):
        topk_accuracy(LOGITS, TARGETS[:3])
    with pytest.raises(ValueError, match="at least one sample"):
        topk_accuracy(torch.zeros(0, 3), torch.zeros(0, dtype=torch.int64))


def test_meter_accumulates_batches() -> None:
    meter = ClassificationMeter(ks=(1, 2))
    meter.update(LOGITS[:3], TARGETS[:3])  # top1 1/3, top2 2/3
    meter.update(LOGITS[3:], TARGETS[3:])  # top1 0/1, top2 1/1
    assert meter.total == 4
    assert meter.compute() == {"top1": 25.0, "top2": 75.0}
    meter.reset()
    with pytest.raises(ValueError, match="no samples"):
        meter.compute()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _meter_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        meter = ClassificationMeter(ks=(1, 2))
        rows = slice(0, 1) if rank == 0 else slice(1, 4)  # uneven split across ranks
        meter.update(LOGITS[rows], TARGETS[rows])
        local = ClassificationMeter(ks=(1, 2), distributed=False)
        local.update(LOGITS[rows], TARGETS[rows])
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps({"all": meter.compute(), "local": local.compute()}))
    finally:
        dist.destroy_process_group()


def test_meter_all_reduces_across_two_gloo_processes(tmp_path: Path) -> None:
    mp.spawn(_meter_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    for rank in range(2):
        out = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert out["all"] == {"top1": 25.0, "top2": 75.0}
    # without reduction rank 0 sees only its own (correct) sample
    assert json.loads((tmp_path / "rank0.json").read_text())["local"] == {"top1": 100.0, "top2": 100.0}
