"""Unit tests of the training engine: LR schedule, the loop, NaN handling, checkpoints, EMA, logging."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from torch import nn

from detkit.checkpoint import load_checkpoint
from detkit.config import ConfigError
from detkit.engine import (
    EvalMetricsWriter,
    LRSchedule,
    LRScheduler,
    MetricsWriter,
    ModelEMA,
    PeriodicCheckpointer,
    Trainer,
    build_sgd,
    lr_factor,
    param_groups,
    restore_training_state,
)
from detkit.cli import run_cli


# --------------------------------------------------------------------------- toy pieces
@dataclass
class ToyBatch:
    images: list[torch.Tensor]
    targets: list[torch.Tensor]
    scale: float = 1.0
    skipped: list[str] = field(default_factory=list)

    def to(self, device):
        return ToyBatch([x.to(device) for x in self.images], [y.to(device) for y in self.targets],
                        self.scale, self.skipped)


class ToyModel(nn.Module):
    """y = W x with a BatchNorm (to have buffers); two losses like a detector."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 2)
        self.bn = nn.BatchNorm1d(2)

    def forward(self, images, targets):
        x = torch.stack(images)
        y = torch.stack(targets)
        out = self.bn(self.lin(x))
        return {"loss_a": ((out - y) ** 2).mean(), "loss_b": 0.1 * out.abs().mean()}


def toy_data(n_iters: int, start: int = 0, nan_at: int | None = None, empty_at: int | None = None):
    """Deterministic batches: batch i depends only on i (like a sampler with a start offset)."""
    for i in range(start, n_iters):
        g = torch.Generator().manual_seed(i)
        xs = [torch.randn(4, generator=g) for _ in range(4)]
        ys = [torch.randn(2, generator=g) for _ in range(4)]
        if empty_at is not None and i == empty_at:
            yield ToyBatch([], [], skipped=["bad1.jpg", "bad2.jpg"])
        scale = float("nan") if nan_at is not None and i == nan_at else 1.0
        yield ToyBatch(xs, ys, scale)


def scaled_loss(model, batch):
    losses = model(batch.images, batch.targets)
    return {k: v * batch.scale for k, v in losses.items()}


def make_trainer(tmp: Path, max_iters: int, start_iter: int = 0, period: int = 2, keep_last: int = 2,
                 nan_at: int | None = None, ema: bool = False, model: ToyModel | None = None) -> Trainer:
    torch.manual_seed(0)
    model = model or ToyModel()
    opt = build_sgd(model, base_lr=0.1, momentum=0.9, weight_decay=1e-4)
    sched = LRSchedule(max_iters, "multistep", steps=[4], gamma=0.1, warmup_iters=2, warmup_factor=0.1)
    hooks = [LRScheduler(sched), PeriodicCheckpointer(tmp / "checkpoints", period, keep_last, {"a": 1})]
    return Trainer(model, opt, toy_data(max_iters, start_iter, nan_at), max_iters, start_iter, hooks,
                   ema=ModelEMA(model, 0.9) if ema else None, loss_fn=scaled_loss)


# --------------------------------------------------------------------------- LR schedule
def test_lr_warmup_multistep_values() -> None:
    f = lambda it: lr_factor(it, 100, "multistep", steps=[20, 30], gamma=0.1, warmup_iters=10, warmup_factor=0.001)
    assert f(0) == pytest.approx(0.001)
    assert f(5) == pytest.approx(0.001 * 0.5 + 0.5)
    assert f(10) == pytest.approx(1.0)
    assert f(19) == pytest.approx(1.0)
    assert f(20) == pytest.approx(0.1)
    assert f(29) == pytest.approx(0.1)
    assert f(30) == pytest.approx(0.01)
    assert f(99) == pytest.approx(0.01)


def test_lr_multistep_matches_torch_scheduler() -> None:
    p = nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=0.5)
    ref = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=[3, 7], gamma=0.2)
    for it in range(10):
        assert opt.param_groups[0]["lr"] == pytest.approx(0.5 * lr_factor(it, 10, "multistep", [3, 7], 0.2))
        opt.step()
        ref.step()


def test_lr_cosine_values() -> None:
    assert lr_factor(0, 100, "cosine") == pytest.approx(1.0)
    assert lr_factor(50, 100, "cosine") == pytest.approx(0.5)
    assert lr_factor(25, 100, "cosine") == pytest.approx(0.5 * (1 + math.cos(math.pi / 4)))
    assert lr_factor(100, 100, "cosine") == pytest.approx(0.0, abs=1e-12)
    assert lr_factor(100, 100, "cosine", final_factor=0.01) == pytest.approx(0.01)
    # warmup multiplies the cosine value
    assert lr_factor(2, 100, "cosine", warmup_iters=4, warmup_factor=0.0) == pytest.approx(
        0.5 * 0.5 * (1 + math.cos(math.pi * 0.02)))
    with pytest.raises(ValueError, match="unknown lr schedule"):
        lr_factor(0, 10, "poly")  # type: ignore[arg-type]


def test_lr_hook_scales_each_group_and_resumes_exactly(tmp_path: Path) -> None:
    t = make_trainer(tmp_path / "a", max_iters=6, period=0)
    lrs = []
    t.register_hooks([_Record(lambda tr: lrs.append([g["lr"] for g in tr.optimizer.param_groups]))])
    t.train()
    sched = LRSchedule(6, "multistep", steps=[4], gamma=0.1, warmup_iters=2, warmup_factor=0.1)
    for it, group_lrs in enumerate(lrs):
        assert group_lrs == pytest.approx([0.1 * sched(it)] * len(group_lrs))
    # a trainer started at iteration 3 sees the same learning rates for 3..5
    t2 = make_trainer(tmp_path / "b", max_iters=6, start_iter=3, period=0)
    lrs2 = []
    t2.register_hooks([_Record(lambda tr: lrs2.append([g["lr"] for g in tr.optimizer.param_groups]))])
    t2.train()
    assert lrs2 == lrs[3:]


class _Record(LRScheduler.__mro__[1]):  # HookBase
    def __init__(self, fn) -> None:
        self.fn = fn

    def after_step(self) -> None:
        self.fn(self.trainer)


def test_param_groups_weight_decay_split() -> None:
    m = ToyModel()
    groups = param_groups(m, 0.1, weight_decay=1e-4, weight_decay_norm=0.0, weight_decay_bias=None)
    by_wd = {g["weight_decay"]: {id(p) for p in g["params"]} for g in groups}
    assert by_wd[0.0] == {id(m.bn.weight), id(m.bn.bias)}
    assert by_wd[1e-4] == {id(m.lin.weight), id(m.lin.bias)}
    m.lin.bias.requires_grad_(False)
    groups = param_groups(m, 0.1, 1e-4, 0.0, 0.0)
    assert sum(len(g["params"]) for g in groups) == 3


# --------------------------------------------------------------------------- loop, NaN, checkpoints
def test_nan_loss_stops_before_step_and_keeps_last_checkpoint(tmp_path: Path) -> None:
    t = make_trainer(tmp_path, max_iters=10, period=2, nan_at=4)  # iteration 5 (1-based) is NaN
    with pytest.raises(FloatingPointError, match=r"iteration 5: non-finite loss: loss_a=nan, loss_b=nan"):
        t.train()
    ckpt = load_checkpoint(tmp_path / "checkpoints" / "last.pth")
    assert ckpt["iteration"] == 4
    # no optimizer step ran after the checkpoint: live parameters equal the checkpointed ones
    # (BatchNorm running stats did move in the failed forward; they are not compared)
    for k, v in t.model.named_parameters():
        assert torch.equal(v, ckpt["model"][k]), k
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point())
    assert not (tmp_path / "checkpoints" / "model_0000005.pth").exists()


def test_checkpoint_keep_last_and_contents(tmp_path: Path) -> None:
    t = make_trainer(tmp_path, max_iters=7, period=1, keep_last=2, ema=True)
    t.train()
    ck_dir = tmp_path / "checkpoints"
    assert sorted(p.name for p in ck_dir.glob("model_*.pth")) == ["model_0000006.pth", "model_0000007.pth"]
    assert not list(ck_dir.glob("*.tmp"))
    ckpt = load_checkpoint(ck_dir / "last.pth")
    assert ckpt["iteration"] == 7 and ckpt["scheduler"]["iteration"] == 7
    assert set(ckpt) >= {"model", "optimizer", "scheduler", "rng_states", "ema", "config"}
    assert ckpt["config"] == {"a": 1}
    assert set(ckpt["rng_states"][0]) >= {"python", "numpy", "torch"}
    assert ckpt["ema"]["updates"] == 7


def test_resume_reproduces_uninterrupted_run(tmp_path: Path) -> None:
    full = make_trainer(tmp_path / "full", max_iters=6, period=0)
    full.train()
    first = make_trainer(tmp_path / "part", max_iters=6, period=3)
    first.max_iters = 3  # stop early, as if killed right after the checkpoint at 3
    first.data_loader = toy_data(3)
    first.train()
    torch.manual_seed(123)  # a fresh process would have other RNG state
    model = ToyModel()
    resumed = make_trainer(tmp_path / "part", max_iters=6, start_iter=3, period=0, model=model)
    ckpt = restore_training_state(tmp_path / "part" / "checkpoints" / "last.pth", model, resumed.optimizer)
    assert ckpt["iteration"] == 3
    resumed.train()
    for k, v in full.model.state_dict().items():
        torch.testing.assert_close(resumed.model.state_dict()[k], v, rtol=1e-6, atol=1e-7)


def test_resume_rejects_other_architecture(tmp_path: Path) -> None:
    from detkit.checkpoint import CheckpointError

    t = make_trainer(tmp_path, max_iters=2, period=0)
    t.train()
    other = nn.Linear(3, 3)
    with pytest.raises(CheckpointError, match="cannot resume"):
        restore_training_state(tmp_path / "checkpoints" / "last.pth", other, torch.optim.SGD(other.parameters(), 0.1))


class WideToyModel(ToyModel):
    """ToyModel with 3 outputs: the same architecture with another 'class count'."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 3)
        self.bn = nn.BatchNorm1d(3)


def test_resume_with_another_class_count_names_the_keys(tmp_path: Path, capsys) -> None:
    t = make_trainer(tmp_path, max_iters=2, period=0)
    t.train()
    last = tmp_path / "checkpoints" / "last.pth"
    wide = WideToyModel()

    def resume(argv):
        restore_training_state(last, wide, torch.optim.SGD(wide.parameters(), 0.1))

    assert run_cli(resume, []) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {last}: cannot resume") and "Traceback" not in err[0]
    msg = err[0]
    assert "tensor(s) differ in shape" in msg
    for key in ("lin.weight (checkpoint (2, 4) vs model (3, 4))", "lin.bias", "bn.weight", "bn.running_mean"):
        assert key in msg, key
    assert "another architecture or class count" in msg and f"model.weights={last}" in msg
    assert "--resume" in msg


def test_resume_lists_missing_and_unexpected_keys(tmp_path: Path) -> None:
    from detkit.checkpoint import CheckpointError

    t = make_trainer(tmp_path, max_iters=1, period=0)
    t.train()
    other = nn.Sequential(nn.Linear(4, 2))
    with pytest.raises(CheckpointError) as e:
        restore_training_state(tmp_path / "checkpoints" / "last.pth", other, torch.optim.SGD(other.parameters(), 0.1))
    msg = str(e.value)
    assert "\n" not in msg
    assert "2 model tensor(s) missing from the checkpoint: 0.weight, 0.bias" in msg
    assert "checkpoint tensor(s) unknown to the model: lin.weight, lin.bias, bn.weight" in msg


class _FakeEval(LRScheduler.__mro__[1]):  # HookBase: puts a metric like EvalHook, improving then worse
    def __init__(self, values: dict[int, float]) -> None:
        self.values = values

    def after_step(self) -> None:
        completed = self.trainer.iter + 1
        if completed in self.values:
            self.trainer.storage.put_eval({"bbox/AP": self.values[completed]}, completed)


def test_best_checkpoint_holds_full_training_state_and_ema(tmp_path: Path) -> None:
    from detkit.checkpoint import load_weights
    from detkit.engine import BestCheckpointer

    t = make_trainer(tmp_path, max_iters=6, period=2, ema=True)
    next(h for h in t.hooks if isinstance(h, PeriodicCheckpointer)).scheduler_state = {"max_iters": 6}
    t.register_hooks([_FakeEval({2: 10.0, 4: 30.0, 6: 20.0}), BestCheckpointer(tmp_path / "checkpoints")])
    t.train()
    ck_dir = tmp_path / "checkpoints"
    best = load_checkpoint(ck_dir / "best.pth")
    last = load_checkpoint(ck_dir / "last.pth")
    assert set(last) <= set(best) and set(best) - set(last) == {"metric"}
    assert set(best) >= {"model", "optimizer", "scaler", "scheduler", "iteration", "rng_states", "ema", "config"}
    assert best["metric"] == {"bbox/AP": 30.0} and best["iteration"] == 4
    assert best["scheduler"]["iteration"] == 4 and best["scheduler"]["max_iters"] == 6  # the periodic's schedule
    assert best["config"] == {"a": 1} and best["ema"]["updates"] == 4
    assert set(best["rng_states"][0]) >= {"python", "numpy", "torch"}
    assert best["optimizer"]["state"]  # momentum buffers
    assert not list(ck_dir.glob("*.tmp"))
    # the raw and averaged weights differ; load_weights takes the EMA ones (what evaluation scored)
    assert not torch.equal(best["model"]["lin.weight"], best["ema"]["model"]["lin.weight"])
    fresh = ToyModel()
    report = load_weights(fresh, ck_dir / "best.pth")
    assert report.weights == "ema" and "EMA weights" in report.source_format
    assert torch.equal(fresh.lin.weight, best["ema"]["model"]["lin.weight"])
    # --resume from best.pth restores raw model, optimizer and EMA
    model = ToyModel()
    resumed = make_trainer(tmp_path / "r", max_iters=6, start_iter=4, period=0, ema=True, model=model)
    ckpt = restore_training_state(ck_dir / "best.pth", model, resumed.optimizer, resumed.scaler, resumed.ema)
    assert ckpt["iteration"] == 4
    assert torch.equal(model.lin.weight, best["model"]["lin.weight"])
    assert torch.equal(resumed.ema.module.lin.weight, best["ema"]["model"]["lin.weight"])
    assert resumed.ema.updates == 4


def test_empty_batches_are_skipped_and_counted(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = ToyModel()
    opt = build_sgd(model, 0.1)
    data = toy_data(4, empty_at=1)
    t = Trainer(model, opt, data, 4, loss_fn=scaled_loss)
    t.train()
    assert t.storage.skipped_images == 2
    assert t.iter == 4


def test_bf16_autocast_on_cpu_and_grad_clip(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = ToyModel()
    t = Trainer(model, build_sgd(model, 0.1), toy_data(3), 3, amp="bf16", clip_grad_norm=0.01, loss_fn=scaled_loss)
    t.train()
    assert t.storage.latest["grad_norm"][0] > 0
    assert all(torch.isfinite(p).all() for p in model.parameters())
    # fp16 without CUDA falls back to fp32 instead of failing
    t16 = Trainer(model, build_sgd(model, 0.1), toy_data(1), 1, amp="fp16", loss_fn=scaled_loss)
    assert t16.amp == ("fp16" if torch.cuda.is_available() and t16.device.type == "cuda" else "none")


def test_grad_scaler_follows_the_resolved_amp(monkeypatch) -> None:
    import detkit.engine.trainer as trainer_mod

    model = ToyModel()
    # explicit fp16 on CPU resolves to fp32: no loss scaling
    t = Trainer(model, build_sgd(model, 0.1), toy_data(1), 1, amp="fp16", device="cpu", loss_fn=scaled_loss)
    assert t.amp == "none" and not t.scaler.is_enabled()
    # auto (or anything) resolving to fp16, as on a pre-Ampere GPU: the scaler is on
    monkeypatch.setattr(trainer_mod, "resolve_amp", lambda amp, device: "fp16")
    t = Trainer(model, build_sgd(model, 0.1), toy_data(1), 1, amp="auto", device="cpu", loss_fn=scaled_loss)
    assert t.amp == "fp16" and t.scaler.is_enabled()
    monkeypatch.setattr(trainer_mod, "resolve_amp", lambda amp, device: "bf16")
    t = Trainer(model, build_sgd(model, 0.1), toy_data(1), 1, amp="fp16", device="cpu", loss_fn=scaled_loss)
    assert t.amp == "bf16" and not t.scaler.is_enabled()


def test_amp_auto_follows_native_bf16_support(monkeypatch) -> None:
    from detkit.engine import resolve_amp
    from detkit.inference.optimize import bf16_supported

    cpu = torch.device("cpu")
    native = bf16_supported(cpu)
    assert resolve_amp("auto", cpu) == ("bf16" if native else "none")
    assert resolve_amp("none", cpu) == "none"
    monkeypatch.setenv("DETKIT_DISABLE_BF16", "1")  # a CPU without bf16 instructions
    assert resolve_amp("auto", cpu) == "none"
    assert resolve_amp("bf16", cpu) == "none"  # emulated bf16 would be slower than fp32
    model = ToyModel()
    assert Trainer(model, build_sgd(model, 0.1), toy_data(1), 1, amp="auto", loss_fn=scaled_loss).amp == "none"


# --------------------------------------------------------------------------- EMA
def test_ema_matches_closed_form() -> None:
    m = ToyModel()
    ema = ModelEMA(m, decay=0.5)
    w0 = m.lin.weight.detach().clone()
    with torch.no_grad():
        m.lin.weight.fill_(1.0)
        m.bn.num_batches_tracked.fill_(7)
    ema.update(m)
    torch.testing.assert_close(ema.module.lin.weight, 0.5 * w0 + 0.5)
    assert int(ema.module.bn.num_batches_tracked) == 7  # integer buffers are copied
    ema.update(m)
    torch.testing.assert_close(ema.module.lin.weight, 0.25 * w0 + 0.75)
    assert not any(p.requires_grad for p in ema.module.parameters())
    state = ema.state_dict()
    ema2 = ModelEMA(ToyModel(), decay=0.5)
    ema2.load_state_dict(state)
    assert ema2.updates == 2
    torch.testing.assert_close(ema2.module.lin.weight, ema.module.lin.weight)
    assert ModelEMA(m, 0.9, warmup=10).current_decay() == pytest.approx(0.9 * (1 - math.exp(-0.1)))


# --------------------------------------------------------------------------- logging
def test_metrics_jsonl_and_truncation_on_resume(tmp_path: Path) -> None:
    t = make_trainer(tmp_path, max_iters=6, period=0)
    w = MetricsWriter(tmp_path, period=2, tensorboard=True)
    t.register_hooks([w, EvalMetricsWriter(w)])
    t.train()
    lines = [json.loads(s) for s in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["iter"] for r in lines] == [2, 4, 6]
    for r in lines:
        assert {"lr", "loss_a", "loss_b", "total_loss", "time", "data_time"} <= set(r)
        assert r["total_loss"] == pytest.approx(r["loss_a"] + r["loss_b"], rel=0.5)
    assert lines[-1]["lr"] == pytest.approx(0.1 * 0.1)  # after the step at 4
    assert list(tmp_path.glob("events.out.tfevents.*"))
    # resume from iteration 2: the lines after 2 are replaced, not duplicated
    t2 = make_trainer(tmp_path, max_iters=6, start_iter=2, period=0)
    w2 = MetricsWriter(tmp_path, period=2, tensorboard=False)
    t2.register_hooks([w2, EvalMetricsWriter(w2)])
    t2.train()
    iters = [json.loads(s)["iter"] for s in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert iters == [2, 4, 6]


def test_progress_bar_shows_each_loss(tmp_path: Path) -> None:
    from detkit.engine import ProgressBar

    t = make_trainer(tmp_path, max_iters=3, period=0)
    bar = ProgressBar()
    seen = []
    t.register_hooks([bar, _Record(lambda tr: seen.append(bar.bar.postfix))])
    t.train()
    assert bar.bar is None  # closed
    assert seen[-1].startswith("loss=") and ", a=" in seen[-1] and ", b=" in seen[-1] and "lr=1.00e-01" in seen[-1]
    assert "loss_a" not in seen[-1] and "total_loss" not in seen[-1]


def test_run_cli_prints_one_line_for_user_errors(capsys) -> None:
    def bad(argv):
        raise ConfigError("cfg.yaml: unknown config key 'train.max_iter'; did you mean 'train.max_iters'?")

    assert run_cli(bad, []) == 2
    err = capsys.readouterr().err.strip()
    assert err == "error: cfg.yaml: unknown config key 'train.max_iter'; did you mean 'train.max_iters'?"

    def boom(argv):
        raise ZeroDivisionError("bug")

    with pytest.raises(ZeroDivisionError):  # real bugs keep their traceback
        run_cli(boom, [])
