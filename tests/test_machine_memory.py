"""detkit.machine.keep_freed_memory: freed activations are reused, not page-faulted in again."""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest

# In a fresh process (the allocator setting is process-wide): free a 24 MB block, then fill a 12 MB
# one, and count the minor page faults of the second. Reused heap memory: none; a fresh mmap: ~3000.
_PROBE = """
import resource, torch
from detkit.machine import keep_freed_memory
applied = keep_freed_memory()
t = torch.empty(24 << 20, dtype=torch.uint8); t.fill_(1); del t
r0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
t = torch.empty(12 << 20, dtype=torch.uint8); t.fill_(1)
print(applied, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - r0)
"""


def _probe(opt_out: bool) -> tuple[bool, int]:
    env = {**os.environ, "DETKIT_KEEP_FREED_MEMORY": "0" if opt_out else "1"}
    env.pop("MALLOC_MMAP_THRESHOLD_", None)
    env.pop("MALLOC_TRIM_THRESHOLD_", None)
    out = subprocess.run([sys.executable, "-c", _PROBE], env=env, capture_output=True, text=True, check=True)
    applied, faults = out.stdout.split()
    return applied == "True", int(faults)


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
                    reason="keep_freed_memory tunes glibc's malloc (Linux)")
def test_keep_freed_memory_reuses_freed_blocks() -> None:
    applied, faults = _probe(opt_out=False)
    assert applied and faults < 200, f"{faults} page faults on a block freed memory could have held"
    applied, faults = _probe(opt_out=True)  # glibc's default: a fresh mmap, faulted in page by page
    assert not applied and faults > 1500, faults


def test_only_the_tools_tune_malloc_not_the_predictor(monkeypatch: pytest.MonkeyPatch) -> None:
    """Building and calling a CPU Predictor never calls mallopt (a library must not retune its host
    process); run_cli(keep_freed_memory=True), what the inference tools use, does."""
    import ctypes

    import numpy as np

    from detkit import Predictor
    from detkit.cli import run_cli
    from detkit.config import DetectionConfig

    calls: list[tuple[int, int]] = []

    class Mallopt:  # what ctypes gives: a callable with argtypes / restype
        argtypes = restype = None

        def __call__(self, param: int, value: int) -> int:
            calls.append((param, value))
            return 1

    class FakeLibc:
        mallopt = Mallopt()

    real_cdll = ctypes.CDLL
    monkeypatch.setattr(ctypes, "CDLL", lambda name, *a, **k: FakeLibc() if "libc" in str(name) else real_cdll(name, *a, **k))
    monkeypatch.setattr(platform, "system", lambda: "Linux")
    monkeypatch.delenv("DETKIT_KEEP_FREED_MEMORY", raising=False)
    cfg = DetectionConfig()
    cfg.model.backbone.name, cfg.model.num_classes = "resnet18", 3
    cfg.input.min_size_test, cfg.input.max_size_test = 64, 96
    Predictor(cfg, device="cpu")(np.zeros((64, 80, 3), np.uint8))
    assert calls == []
    assert run_cli(lambda argv: 0, [], keep_freed_memory=True) == 0
    assert len(calls) == 2  # mmap threshold and trim threshold
