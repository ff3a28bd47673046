"""detkit.ops.roi_align against torchvision.ops.roi_align, run side by side in each test."""

from __future__ import annotations

import ast
import importlib
import warnings
from pathlib import Path
from typing import Union

import pytest
import torch
import torchvision

from detkit.ops import roi_align, roi_align_plan_stats

impl = importlib.import_module("detkit.ops.roi_align")  # the module (the package attribute is the function)


def make_rois(num: int, images: int, height: int, width: int, scale: float, seed: int) -> torch.Tensor:
    """[num, 5] rois in image pixels: log-uniform sizes from sub-pixel to ~3x the image,
    centres up to 30% outside it, a few inverted and exactly degenerate boxes."""
    gen = torch.Generator().manual_seed(seed)
    img = torch.tensor([width, height], dtype=torch.float32) / scale
    centres = img * (torch.rand(num, 2, generator=gen) * 1.6 - 0.3)
    sides = torch.exp(torch.empty(num, 2).uniform_(-3.0, 1.2, generator=gen)) * img
    boxes = torch.cat([centres - sides / 2, centres + sides / 2], dim=1)
    # inverted in both axes (with only one inverted, torchvision's aligned adaptive kernel
    # sizes a vector by a negative sample count and raises; see test_one_axis_inverted_box)
    boxes[: num // 10] = boxes[: num // 10, [2, 3, 0, 1]]
    boxes[num // 10 : num // 5, 2] = boxes[num // 10 : num // 5, 0]  # zero width
    batch = torch.randint(0, images, (num, 1), generator=gen).float()
    return torch.cat([batch, boxes], dim=1)


def both(
    x: torch.Tensor,
    rois: Union[torch.Tensor, list[torch.Tensor]],
    output_size: Union[int, tuple[int, int]],
    scale: float,
    sampling_ratio: int,
    aligned: bool,
    seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(torchvision out, detkit out, torchvision input grad, detkit input grad) for one random grad_out."""
    xa = x.detach().clone().requires_grad_()
    xb = x.detach().clone().requires_grad_()
    ref = torchvision.ops.roi_align(xa, rois, output_size, scale, sampling_ratio, aligned)
    out = roi_align(xb, rois, output_size, scale, sampling_ratio, aligned)
    grad = torch.randn(ref.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(ref.dtype)
    ref.backward(grad)
    out.backward(grad)
    return ref, out, xa.grad, xb.grad


def rel_err(ref: torch.Tensor, got: torch.Tensor) -> float:
    return ((ref.double() - got.double()).abs().max() / ref.double().abs().max().clamp(min=1e-30)).item()


@pytest.mark.parametrize("aligned", [False, True])
@pytest.mark.parametrize("sampling_ratio", [0, -1, 1, 2, 3])
@pytest.mark.parametrize("output_size", [7, (14, 5)])
def test_parity_with_torchvision(aligned: bool, sampling_ratio: int, output_size) -> None:
    torch.manual_seed(0)
    x = torch.randn(3, 4, 19, 27)
    rois = make_rois(60, 3, 19, 27, 0.25, seed=sampling_ratio + 10 * aligned)
    ref, out, gref, gout = both(x, rois, output_size, 0.25, sampling_ratio, aligned)
    assert out.shape == ref.shape and out.dtype == ref.dtype
    assert ref.abs().max() > 0.1  # the case pools something
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)
    assert gref.abs().max() > 0.1
    assert rel_err(gref, gout) < 1e-4


@pytest.mark.parametrize("aligned", [False, True])
def test_parity_float64_is_tight(aligned: bool) -> None:
    torch.manual_seed(1)
    x = torch.randn(2, 3, 13, 17, dtype=torch.float64)
    rois = make_rois(40, 2, 13, 17, 0.5, seed=3).double()
    for sr in (0, 2):
        ref, out, gref, gout = both(x, rois, (5, 4), 0.5, sr, aligned)
        assert out.dtype == torch.float64 and gout.dtype == torch.float64
        torch.testing.assert_close(out, ref, atol=1e-12, rtol=0)
        assert rel_err(gref, gout) < 1e-12


def test_detection_shapes_box_and_mask_heads() -> None:
    """Realistic proposals on one FPN level: 7x7 (sr 0 / aligned) and 14x14 (sr 2 / legacy)."""
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(2, 32, 40, 48, generator=gen)
    centres = torch.rand(300, 2, generator=gen) * torch.tensor([384.0, 320.0])
    sides = torch.exp(torch.empty(300, 2).uniform_(3.0, 6.0, generator=gen))
    boxes = torch.cat([centres - sides / 2, centres + sides / 2], dim=1).clamp(0, 384)
    rois = torch.cat([torch.randint(0, 2, (300, 1), generator=gen).float(), boxes], dim=1)
    for size, sr, aligned in ((7, 0, True), (14, 2, False), (7, 2, False)):
        ref, out, gref, gout = both(x, rois, size, 1 / 8, sr, aligned)
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)
        assert rel_err(gref, gout) < 1e-4


def test_border_rules_match_torchvision() -> None:
    """Samples exactly at -1 / H (kept, clamped) and just beyond (dropped), tiny and huge rois."""
    x = torch.randn(1, 2, 8, 10)
    rois = torch.tensor(
        [
            [0, 9.0, 7.0, 11.0, 9.0],  # single sample at (x, y) = (10, 8) = (W, H): kept
            [0, -2.0, -2.0, 0.0, 0.0],  # sample at (-1, -1): kept
            [0, 9.0, 7.0, 11.002, 9.002],  # sample just beyond W and H: dropped
            [0, -2.002, -2.002, 0.0, 0.0],  # just below -1: dropped
            [0, 3.3, 2.2, 3.31, 2.21],  # sub-pixel
            [0, -500.0, -400.0, 900.0, 700.0],  # far larger than the map
            [0, 4.0, 4.0, 4.0, 4.0],  # a point
        ]
    )
    for aligned in (False, True):
        for sr in (1, 0, 4):
            ref, out, gref, gout = both(x, rois, 1 if sr == 1 else 3, 1.0, sr, aligned)
            torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)
            assert rel_err(gref, gout) < 1e-4
    kept = roi_align(x, rois[:4], 1, 1.0, 1, False)
    assert kept[0].abs().sum() > 0 and kept[1].abs().sum() > 0
    assert kept[2].abs().sum() == 0 and kept[3].abs().sum() == 0


def test_one_axis_inverted_box() -> None:
    """x2 < x1 but y2 > y1: torchvision's legacy mode clamps it to width 1 (matched here); its
    aligned adaptive mode gets a negative sample count and fails, detkit pools nothing (zeros)."""
    x = torch.randn(1, 2, 8, 10)
    rois = torch.tensor([[0, 6.0, 1.0, 2.0, 7.0]])
    for sr in (0, 2):
        ref, out, gref, gout = both(x, rois, 3, 1.0, sr, False)
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)
        assert rel_err(gref, gout) < 1e-4
    ref, out, gref, gout = both(x, rois, 3, 1.0, 2, True)  # fixed sampling walks the box backwards
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)
    assert rel_err(gref, gout) < 1e-4
    assert roi_align(x, rois, 3, 1.0, 0, True).abs().sum() == 0


def test_empty_rois() -> None:
    x = torch.randn(2, 3, 9, 11, requires_grad=True)
    out = roi_align(x, torch.zeros(0, 5), 7, 0.5, 0, True)
    assert out.shape == (0, 3, 7, 7)
    out.sum().backward()
    assert x.grad is not None and x.grad.shape == x.shape and x.grad.abs().sum() == 0
    out_list = roi_align(x, [torch.zeros(0, 4), torch.zeros(0, 4)], (7, 5))
    assert out_list.shape == (0, 3, 7, 5)
    # empty feature maps (torchvision's CPU kernel reads out of bounds here): zeros, no crash
    for shape in ((1, 0, 5, 5), (1, 3, 0, 5), (1, 3, 5, 0)):
        xe = torch.randn(shape, requires_grad=True)
        out = roi_align(xe, torch.tensor([[0.0, 1, 1, 3, 3]]), 2, 1.0, 0, True)
        assert out.shape == (1, shape[1], 2, 2) and out.abs().sum() == 0
        out.sum().backward()
        assert xe.grad is not None and xe.grad.shape == shape


def test_deterministic() -> None:
    x = torch.randn(2, 8, 21, 23)
    rois = make_rois(80, 2, 21, 23, 0.5, seed=7)
    grad = torch.randn(80, 8, 7, 7)
    results = []
    for _ in range(2):
        xi = x.clone().requires_grad_()
        out = roi_align(xi, rois, 7, 0.5, 0, True)
        out.backward(grad)
        results.append((out, xi.grad))
    assert torch.equal(results[0][0], results[1][0])
    assert torch.equal(results[0][1], results[1][1])


def test_thread_count_does_not_change_results() -> None:
    x = torch.randn(2, 8, 21, 23)
    rois = make_rois(80, 2, 21, 23, 0.5, seed=8)
    threads = torch.get_num_threads()
    try:
        outs = []
        for n in (1, 2):
            torch.set_num_threads(n)
            xi = x.clone().requires_grad_()
            out = roi_align(xi, rois, 7, 0.5, 0, True)
            out.sum().backward()
            outs.append((out, xi.grad))
    finally:
        torch.set_num_threads(threads)
    torch.testing.assert_close(outs[0][0], outs[1][0], atol=1e-6, rtol=0)
    torch.testing.assert_close(outs[0][1], outs[1][1], atol=1e-5, rtol=0)


def test_chunks_and_blocks(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tiny chunk / block limits exercise the multi-chunk, multi-block paths."""
    x = torch.randn(2, 5, 17, 19)
    rois = make_rois(50, 2, 17, 19, 0.5, seed=9)
    monkeypatch.setattr(impl, "_MAX_ENTRIES", 3000)
    monkeypatch.setattr(impl, "_BLOCK_ELEMS", 700)
    stats = roi_align_plan_stats(rois, (17, 19), 7, 0.5, 0, True)
    assert stats["chunks"] > 3
    ref, out, gref, gout = both(x, rois, 7, 0.5, 0, True)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)
    assert rel_err(gref, gout) < 1e-4


def test_gradcheck_float64() -> None:
    """The backward is the adjoint of the forward (checked numerically, independent of torchvision)."""
    x = torch.randn(2, 1, 6, 7, dtype=torch.float64, requires_grad=True)
    rois = torch.tensor(
        [[0, 1.3, 0.7, 5.9, 6.2], [1, -1.5, 2.1, 9.3, 5.5], [1, 2.2, 2.2, 3.1, 2.9]], dtype=torch.float64
    )
    assert torch.autograd.gradcheck(lambda t: roi_align(t, rois, 3, 1.0, 0, True), (x,), fast_mode=True)
    assert torch.autograd.gradcheck(lambda t: roi_align(t, rois, (2, 3), 1.0, 2, False), (x,), fast_mode=True)


def test_half_precision_computes_in_float32() -> None:
    torch.manual_seed(2)
    x = torch.randn(2, 4, 15, 16)
    rois = make_rois(30, 2, 15, 16, 0.5, seed=4)
    for dtype in (torch.float16, torch.bfloat16):
        xh = x.to(dtype).requires_grad_()
        rois_h = rois.to(dtype)
        out = roi_align(xh, rois_h, 5, 0.5, 0, True)
        out.float().sum().backward()
        assert out.dtype == dtype and xh.grad is not None and xh.grad.dtype == dtype
        # torchvision on the same (rounded) values in fp32, rounded once at the end
        xf = xh.detach().float().requires_grad_()
        ref = torchvision.ops.roi_align(xf, rois_h.float(), 5, 0.5, 0, True)
        ref.sum().backward()
        # one rounding step away from the fp32 result (2**-8 relative covers fp16 and bf16)
        torch.testing.assert_close(out.float(), ref.to(dtype).float(), atol=1e-4, rtol=2**-8)
        torch.testing.assert_close(out.float(), ref, atol=1e-2, rtol=1e-2)
        torch.testing.assert_close(xh.grad.float(), xf.grad, atol=1e-2, rtol=1e-2)
    # torchvision has a float16 CPU kernel (computing in float16): agree to half precision
    xh = x.half()
    ref16 = torchvision.ops.roi_align(xh, rois.half(), 5, 0.5, 0, True)
    torch.testing.assert_close(roi_align(xh, rois.half(), 5, 0.5, 0, True).float(), ref16.float(), atol=2e-2, rtol=2e-2)


def test_inputs_like_torchvision() -> None:
    """List-of-boxes input, int/tuple output_size, channels-last input, mixed roi dtype."""
    torch.manual_seed(3)
    x = torch.randn(2, 3, 12, 14)
    boxes = [torch.tensor([[1.0, 1.0, 9.0, 7.0], [0.0, 2.0, 4.0, 11.0]]), torch.tensor([[3.0, 3.5, 13.0, 11.0]])]
    ref = torchvision.ops.roi_align(x, boxes, [4, 3], 1.0, 2, False)
    torch.testing.assert_close(roi_align(x, boxes, [4, 3], 1.0, 2, False), ref, atol=1e-5, rtol=0)
    torch.testing.assert_close(roi_align(x, boxes, 4), torchvision.ops.roi_align(x, boxes, 4), atol=1e-5, rtol=0)
    xc = x.contiguous(memory_format=torch.channels_last).requires_grad_()
    rois = torch.cat([torch.tensor([[0.0], [0.0], [1.0]]), torch.cat(boxes)], dim=1)
    out = roi_align(xc, rois, 4, 1.0, 0, True)
    out.sum().backward()
    xr = x.clone().requires_grad_()
    torchvision.ops.roi_align(xr, rois, 4, 1.0, 0, True).sum().backward()
    assert xc.grad is not None and xr.grad is not None
    torch.testing.assert_close(xc.grad, xr.grad, atol=1e-5, rtol=0)
    # fp64 boxes with fp32 features (torchvision insists on equal dtypes; detkit casts)
    torch.testing.assert_close(roi_align(x, rois.double(), 4, 1.0, 0, True), out.detach(), atol=1e-6, rtol=0)


def test_bad_input_raises_clear_errors() -> None:
    x = torch.randn(2, 3, 8, 8)
    with pytest.raises(ValueError, match="batch index"):
        roi_align(x, torch.tensor([[2.0, 0, 0, 4, 4]]), 3)
    with pytest.raises(ValueError, match=r"\[K, 5\]"):
        roi_align(x, torch.zeros(3, 4), 3)
    with pytest.raises(ValueError, match=r"boxes\[1\]"):
        roi_align(x, [torch.zeros(1, 4), torch.zeros(1, 5)], 3)
    with pytest.raises(ValueError, match=r"\[N, C, H, W\]"):
        roi_align(x[0], torch.zeros(1, 5), 3)


def test_non_cpu_tensors_go_to_torchvision(monkeypatch: pytest.MonkeyPatch) -> None:
    """CUDA (and any other device) uses torchvision's kernel; checked with the meta device."""
    calls = []

    def fake(input, boxes, output_size, spatial_scale=1.0, sampling_ratio=-1, aligned=False):
        calls.append((input.device.type, tuple(output_size), spatial_scale, sampling_ratio, aligned))
        return torch.empty(boxes.shape[0], input.shape[1], *output_size, device=input.device)

    monkeypatch.setattr(torchvision.ops, "roi_align", fake)
    out = roi_align(torch.empty(1, 3, 8, 8, device="meta"), torch.empty(4, 5, device="meta"), 7, 0.25, 2, True)
    assert out.shape == (4, 3, 7, 7)
    assert calls == [("meta", (7, 7), 0.25, 2, True)]
    roi_align(torch.randn(1, 3, 8, 8), torch.tensor([[0.0, 1, 1, 5, 5]]), 7)
    assert len(calls) == 1  # CPU stays on the fast path


def test_tracing_and_compiling_use_torchvision_op(monkeypatch: pytest.MonkeyPatch) -> None:
    """Traced / exported / compiled graphs get torchvision's registered operator (ONNX symbolic)."""
    x = torch.randn(2, 4, 10, 12)
    rois = torch.tensor([[0, 1.0, 1, 8, 7], [1, 0, 2, 9, 9.5]])

    class Pool(torch.nn.Module):
        def forward(self, feats: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
            return roi_align(feats, boxes, 3, 1.0, 0, True)

    with warnings.catch_warnings():  # torch.jit.trace is deprecated in recent torch; tracer warnings
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(Pool(), (x, rois), check_trace=False)
    assert "torchvision::roi_align" in str(traced.graph)
    assert "_RoIAlignCPU" not in str(traced.graph)
    torch.testing.assert_close(traced(x, rois), torchvision.ops.roi_align(x, rois, 3, 1.0, 0, True))
    assert not impl._use_torchvision(x)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert impl._use_torchvision(x)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_torchvision() -> None:
    x = torch.randn(2, 4, 16, 16, device="cuda")
    rois = make_rois(20, 2, 16, 16, 0.5, seed=11).cuda()
    torch.testing.assert_close(
        roi_align(x, rois, 7, 0.5, 0, True), torchvision.ops.roi_align(x, rois, 7, 0.5, 0, True), atol=0, rtol=0
    )


def test_plan_is_smaller_than_torchvision_loop() -> None:
    """Adaptive sampling merges samples on shared pixel rows: fewer loads than torchvision's 4 per sample."""
    gen = torch.Generator().manual_seed(6)
    centres = torch.rand(200, 2, generator=gen) * 256
    sides = torch.empty(200, 2).uniform_(112, 224, generator=gen)
    rois = torch.cat([torch.zeros(200, 1), centres - sides / 2, centres + sides / 2], dim=1)
    stats = roi_align_plan_stats(rois, (32, 32), 7, 1 / 8, 0, True)
    assert stats["entries"] < 0.6 * stats["torchvision_loads"]
    stats2 = roi_align_plan_stats(rois, (32, 32), 7, 1 / 8, 2, False)
    assert stats2["entries"] <= stats2["torchvision_loads"]


def test_ops_imports_only_torch_and_torchvision() -> None:
    ops_dir = Path(impl.__file__).parent
    for path in ops_dir.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level > 0:  # relative: only siblings inside detkit.ops
                    siblings = {p.stem for p in ops_dir.glob("*.py")}
                    assert node.module is None or node.module in siblings, f"{path.name} imports .{node.module}"
                    continue
                names = [node.module or ""]
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                assert top in {"torch", "torchvision", "__future__", "typing"}, f"{path.name} imports {name}"
