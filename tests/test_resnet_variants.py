"""The ResNet paper's own variants: shortcut options A/B/C and the CIFAR ResNets.

Parameter counts are checked against closed-form sums (ImageNet options) and against the paper's
Table 6 figures (CIFAR), never against numbers read back from the models themselves.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from torch import nn

from detkit.checkpoint import CheckpointError, load_weights
from detkit.config import DetectionConfig, load_config
from detkit.config.schema import CIFAR_ARCHS as SCHEMA_CIFAR_ARCHS
from detkit.config.schema import BackboneConfig, ClsInputConfig, ClsModelConfig, ClsTrainConfig
from detkit.data.transforms import build_classification_transform
from detkit.models import build_classifier
from detkit.models.backbones import PadShortcut, build_cifar_resnet
from detkit.models.backbones.resnet import BasicBlock, Bottleneck, build_resnet
from detkit.models.build import build_detector
from detkit.models.classifier import CIFAR_ARCHS
from detkit.inference.optimize import optimize_for_inference
from detkit.structures import Targets

ROOT = Path(__file__).resolve().parents[1]


def _params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def _proj(cin: int, cout: int) -> int:
    """1x1 conv without bias + BN weight and bias."""
    return cin * cout + 2 * cout


# resnet18 / resnet50 stage widths: (in_ch of the stage's first block, out_ch, blocks)
_R18 = [(64, 64, 2), (64, 128, 2), (128, 256, 2), (256, 512, 2)]
_R50 = [(64, 256, 3), (256, 512, 4), (512, 1024, 6), (1024, 2048, 3)]


def _expected_shortcut_params(stages, option: str) -> int:
    """Parameters on the shortcut paths of a ResNet built with ``option``, from the stage table.

    A stage's first block changes the shape where ``cin != cout`` (every stage of these tables
    but resnet18's res2, which has stride 1 and 64 -> 64); its other blocks never do.
    """
    total = 0
    for cin, cout, n in stages:
        if option == "B":
            total += _proj(cin, cout) if cin != cout else 0
        elif option == "C":
            total += _proj(cin, cout) + (n - 1) * _proj(cout, cout)
    return total


@pytest.mark.parametrize("arch,stages", [("resnet18", _R18), ("resnet50", _R50)])
def test_shortcut_options_parameter_counts_and_names(arch: str, stages) -> None:
    nets = {opt: build_resnet(arch, norm="BN", freeze_at=0, shortcut=opt) for opt in "ABC"}
    base = _params(nets["B"]) - _expected_shortcut_params(stages, "B")  # everything off the shortcut paths
    for opt, net in nets.items():
        assert net.shortcut_option == opt
        assert _params(net) == base + _expected_shortcut_params(stages, opt), opt
    # A: no parameters anywhere on a shortcut path
    for m in nets["A"].modules():
        if isinstance(m, (BasicBlock, Bottleneck)) and m.skip is not None:
            assert isinstance(m.skip, PadShortcut) and _params(m.skip) == 0
    # C: every block has a projection; B's keys keep their meaning, C only adds proj_shortcut.*
    blocks_c = [m for m in nets["C"].modules() if isinstance(m, (BasicBlock, Bottleneck))]
    assert all(m.skip is not None and hasattr(m.skip, "conv") for m in blocks_c)
    keys_b, keys_c = set(nets["B"].state_dict()), set(nets["C"].state_dict())
    assert keys_b < keys_c
    assert {k.split(".")[2] for k in keys_c - keys_b} == {"proj_shortcut"}
    for k in keys_b:
        assert nets["B"].state_dict()[k].shape == nets["C"].state_dict()[k].shape, k
    assert not any("proj_shortcut" in k or ".shortcut." in k for k in nets["A"].state_dict())


@pytest.mark.parametrize("option", ["A", "B", "C"])
@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
def test_shortcut_options_shapes_forward_backward(arch: str, option: str) -> None:
    torch.manual_seed(0)
    net = build_resnet(arch, norm="BN", freeze_at=0, shortcut=option)
    x = torch.randn(2, 3, 64, 96)
    out = net(x)
    ref = {k: v.shape for k, v in build_resnet(arch, norm="BN", freeze_at=0)(x).items()}
    assert {k: v.shape for k, v in out.items()} == ref  # the option never changes the feature shapes
    sum(v.float().square().mean() for v in out.values()).backward()
    for name, p in net.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name


def test_option_a_pads_with_exact_zeros() -> None:
    torch.manual_seed(0)
    x = torch.randn(2, 16, 9, 7) + 3.0  # no zeros in the input
    y = PadShortcut(16, 32, stride=2)(x)
    assert y.shape == (2, 32, 5, 4)
    assert torch.equal(y[:, :16], x[:, :, ::2, ::2])
    assert torch.count_nonzero(y[:, 16:]) == 0

    # inside a real network: the widening blocks' shortcut outputs have exactly-zero new channels
    net = build_cifar_resnet(20).eval()
    seen = []

    def hook(mod, inp, out):
        seen.append((mod.in_channels, out))

    for m in net.modules():
        if isinstance(m, PadShortcut):
            m.register_forward_hook(hook)
    with torch.no_grad():
        net(torch.randn(2, 3, 32, 32))
    assert [(c, tuple(o.shape[1:])) for c, o in seen] == [(16, (32, 16, 16)), (32, (64, 8, 8))]
    for c, o in seen:
        assert torch.count_nonzero(o[:, c:]) == 0 and torch.count_nonzero(o[:, :c]) > 0


# the paper's Table 6 parameter counts, to the digits it gives
PAPER_PARAMS = {20: (0.27, 2), 32: (0.46, 2), 44: (0.66, 2), 56: (0.85, 2), 110: (1.7, 1), 1202: (19.4, 1)}


@pytest.mark.parametrize("depth", sorted(PAPER_PARAMS))
def test_cifar_resnet_parameter_counts_match_the_paper(depth: int) -> None:
    clf = build_classifier(f"cifar_resnet{depth}", num_classes=10)
    millions, digits = PAPER_PARAMS[depth]
    assert round(_params(clf) / 1e6, digits) == millions
    assert clf.backbone.shortcut_option == "A"
    n = (depth - 2) // 6
    assert sum(isinstance(m, BasicBlock) for m in clf.modules()) == 3 * n  # depth = 6n + 2
    if depth == 20:  # projections (option B) add parameters the paper's networks don't have
        assert _params(build_classifier("cifar_resnet20", 10, shortcut="B")) == _params(clf) + _proj(16, 32) + _proj(32, 64)


@pytest.mark.parametrize("option", ["A", "B", "C"])
def test_cifar_resnet_shapes_forward_backward(option: str) -> None:
    torch.manual_seed(0)
    clf = build_classifier("cifar_resnet20", num_classes=10, shortcut=option)
    x = torch.randn(4, 3, 32, 32)
    assert clf.backbone(x)["res4"].shape == (4, 64, 8, 8)
    logits = clf(x)
    assert logits.shape == (4, 10)
    nn.functional.cross_entropy(logits, torch.arange(4)).backward()
    for name, p in clf.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name


def test_bad_names_are_clear_errors() -> None:
    with pytest.raises(ValueError, match="shortcut option 'D'"):
        build_resnet("resnet18", shortcut="D")
    with pytest.raises(ValueError, match="6n \\+ 2"):
        build_cifar_resnet(21)
    with pytest.raises(ValueError, match="cifar_resnet20"):
        build_classifier("cifar_resnet21", 10)
    with pytest.raises(ValueError, match="did you mean 'cifar_resnet20'"):
        ClsModelConfig(arch="cifar-resnet20")
    with pytest.raises(ValueError):
        BackboneConfig(shortcut="D")
    assert SCHEMA_CIFAR_ARCHS == CIFAR_ARCHS  # the config's list is the models' list


@pytest.mark.parametrize("option", ["A", "C"])
def test_torchvision_weights_load_only_into_option_b(option: str) -> None:
    tv = torchvision.models.resnet18(weights=None).state_dict()
    report = load_weights(build_classifier("resnet18", 1000), tv)  # B: loads
    assert not report.missing
    with pytest.raises(CheckpointError, match=f"shortcut option {option}") as e:
        load_weights(build_classifier("resnet18", 1000, shortcut=option), tv)
    assert "\n" not in str(e.value) and "shortcut=B" in str(e.value)

    cfg = DetectionConfig()
    cfg.model.backbone.name, cfg.model.backbone.shortcut = "resnet18", option
    with pytest.raises(CheckpointError, match=f"shortcut option {option}"):
        load_weights(build_detector(cfg, num_classes=2).backbone.bottom_up, tv)


@pytest.mark.parametrize("option", ["A", "C"])
def test_detector_with_shortcut_option_trains_and_optimizes(option: str) -> None:
    cfg = DetectionConfig()
    m = cfg.model
    m.backbone.name, m.backbone.norm, m.backbone.freeze_at, m.backbone.shortcut = "resnet18", "FrozenBN", 0, option
    m.fpn.out_channels = 32
    m.rpn.pre_nms_topk_test, m.rpn.post_nms_topk_test = 200, 50
    m.roi_heads.box_head.fc_dim = 64
    torch.manual_seed(0)
    model = build_detector(cfg, num_classes=2)
    assert model.backbone.bottom_up.shortcut_option == option
    img = (torch.rand(3, 96, 128) * 255).to(torch.uint8)
    target = Targets(boxes=torch.tensor([[10.0, 12.0, 60.0, 70.0]]), labels=torch.tensor([1]))
    model.train()
    losses = model([img], [target])
    sum(losses.values()).backward()
    grads = [p.grad for n, p in model.backbone.bottom_up.named_parameters() if "shortcut" in n]
    if option == "C":
        assert grads and all(g is not None and g.abs().sum() > 0 for g in grads)
    else:
        assert not grads

    # the fused inference path keeps the option's shortcut and gives the same features
    model.eval()
    fast = optimize_for_inference(copy.deepcopy(model), "fp32")
    with torch.no_grad():
        x, _ = model.preprocess([img])
        ref, out = model.backbone(x), fast.backbone(x)
    for k in ref:
        torch.testing.assert_close(out[k], ref[k], atol=1e-3, rtol=1e-3)


def test_pad_crop_transform_is_a_window_of_the_zero_padded_image() -> None:
    cfg = ClsInputConfig(size=32, train_crop="pad_crop", crop_padding=4, hflip_prob=0.5,
                         mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
    rng = np.random.default_rng(0)
    img = rng.integers(1, 256, size=(32, 32, 3)).astype(np.uint8)  # no zeros: padding is recognisable
    padded = np.zeros((40, 40, 3), np.float32)
    padded[4:36, 4:36] = img
    t = build_classification_transform(cfg, is_train=True, seed=0)
    offsets, flips = set(), set()
    for _ in range(40):
        out = t(img).numpy().transpose(1, 2, 0)
        assert out.shape == (32, 32, 3)
        hits = [(dy, dx, f) for dy in range(9) for dx in range(9) for f in (False, True)
                if np.array_equal(out, (padded[dy:dy + 32, dx:dx + 32][:, ::-1] if f else padded[dy:dy + 32, dx:dx + 32]))]
        assert hits, "the crop is not a 32x32 window of the 4-pixel zero-padded image"
        offsets.add(hits[0][:2])
        flips.add(hits[0][2])
    assert len(offsets) > 5 and flips == {False, True}


def test_cifar_config_is_the_papers_recipe() -> None:
    cfg = load_config(ROOT / "configs" / "classification" / "cifar_resnet20.yaml")
    t, i = cfg.train, cfg.input
    assert cfg.model.arch == "cifar_resnet20" and cfg.model.shortcut in (None, "A")
    assert (t.optimizer, t.base_lr, t.momentum, t.weight_decay, t.batch_size) == ("sgd", 0.1, 0.9, 1e-4, 128)
    assert (t.lr_schedule, t.steps, t.gamma, t.max_iters) == ("multistep", [32000, 48000], 0.1, 64000)
    assert (i.size, i.train_crop, i.crop_padding, i.hflip_prob) == (32, "pad_crop", 4, 0.5)
    with pytest.raises(ValueError, match="train.steps"):
        ClsTrainConfig(lr_schedule="multistep", steps=[])


def test_embedded_cifar_variant_runs_multistep_to_max_iters(tmp_path: Path) -> None:
    """The embedded variant's tool path, shortened: max_iters ends mid-epoch, the LR drops at the steps."""
    from detkit.cli import run_cli
    from detkit.config import load_classification_config
    from detkit.data.synthetic import make_shapes_imagefolder
    from detkit.engine.run_classification import pretrain_classifier

    data = tmp_path / "data"
    make_shapes_imagefolder(data, num_per_class_train=6, num_per_class_val=2, image_size=32, seed=0)
    out = tmp_path / "run"
    overrides = {"data.train": data / "train", "data.val": data / "val", "data.synthetic": "null",
                 "train.batch_size": 8, "train.max_iters": 5, "train.steps": "[2,4]", "train.log_period": 1,
                 "dataloader.num_workers": 0, "train.amp": "none"}
    cfg = load_classification_config(ROOT / "configs" / "classification" / "shapes_cifar_resnet20.yaml",
                                     [f"{k}={v}" for k, v in overrides.items()])
    assert run_cli(lambda _: pretrain_classifier(cfg, out) and 0) == 0
    records = [json.loads(s) for s in (out / "metrics.jsonl").read_text().splitlines()]
    lrs = [r["lr"] for r in records if "total_loss" in r]
    assert lrs == pytest.approx([0.1, 0.1, 0.01, 0.01, 0.001])
    assert [r["iter"] for r in records if "top1" in r] == [3, 5]  # 24 images / 8: epoch 2 is partial
    ck = torch.load(out / "checkpoints" / "last.pth", weights_only=True)
    clf = build_classifier("cifar_resnet20", 4)
    clf.load_state_dict(ck["model"])
