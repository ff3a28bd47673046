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
