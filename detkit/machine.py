"""What this machine is: CPU model, cores, the CPU flags that matter for speed, software versions, GPUs.

The one place that reads ``/proc/cpuinfo`` and asks PyTorch what this CPU / GPU can do (bf16,
oneDNN); :mod:`detkit.inference.optimize` (re-exporting :func:`bf16_supported`), :mod:`detkit.benchmark` and
``benchmarks/*.py`` (report headers) use it.

Example::

    info = machine_info()
    print(info.cpu_summary())  # "AMD EPYC 9654 (2 CPUs; avx512_bf16 avx512_vnni)"

Layer 0: imports torch and the standard library only, nothing from detkit.
"""

from __future__ import annotations

import functools
import os
import platform
from dataclasses import dataclass
from typing import Optional, Union

import torch

from .errors import UsageError

__all__ = [
    "MATMUL_FLAGS", "SPEED_FLAGS", "MachineInfo", "GpuInfo", "cpu_model_name", "cpu_flags", "cpu_speed_flags",
    "usable_cpu_count", "physical_core_count", "cpu_capability", "mkldnn_linear_available", "cpu_bf16_native",
    "bf16_supported",
    "torchvision_version", "gpu_info", "machine_info", "keep_freed_memory", "release_freed_memory",
]

#: flags of fast bf16 / int8 matrix instructions (AVX512-BF16, AMX, VNNI)
MATMUL_FLAGS: tuple[str, ...] = ("avx512_bf16", "amx_bf16", "amx_int8", "avx512_vnni", "avx_vnni")
#: the CPU flags reported by :class:`MachineInfo`: the matrix flags and the vector widths
SPEED_FLAGS: tuple[str, ...] = MATMUL_FLAGS + ("avx512f", "avx2")


@functools.lru_cache(maxsize=1)
def _cpuinfo() -> tuple[tuple[str, str], ...]:
    """``(key, value)`` lines of /proc/cpuinfo, keys lower-cased (empty where the file does not exist)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            return tuple((k.strip().lower(), v.strip()) for k, _, v in (ln.partition(":") for ln in f) if k.strip())
    except OSError:
        return ()


def cpu_model_name() -> str:
    """The CPU's model name from /proc/cpuinfo (Linux), else what :mod:`platform` reports, else ``"unknown"``."""
    for key, value in _cpuinfo():
        if key in ("model name", "hardware", "cpu model") and value:
            return value
    return platform.processor() or platform.machine() or "unknown"


def cpu_flags() -> frozenset[str]:
    """All CPU feature flags (x86 ``flags``, Arm ``Features``) of the first CPU; empty where unknown."""
    return next((frozenset(v.split()) for k, v in _cpuinfo() if k in ("flags", "features")), frozenset())


def cpu_speed_flags() -> tuple[str, ...]:
    """The :data:`SPEED_FLAGS` this CPU has, in that order."""
    flags = cpu_flags()
    return tuple(f for f in SPEED_FLAGS if f in flags)


def usable_cpu_count() -> int:
    """Logical CPUs this process may run on (its affinity mask), else all of them."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 0


def physical_core_count() -> Optional[int]:
    """Physical cores (distinct ``physical id`` / ``core id`` pairs of /proc/cpuinfo); None where unknown."""
    cores, package = set(), "0"
    for key, value in _cpuinfo():
        if key == "physical id":
            package = value
        elif key == "core id":
            cores.add((package, value))
    return len(cores) or None


def cpu_capability() -> str:
    """The vector ISA PyTorch's CPU kernels use here (``torch.backends.cpu.get_cpu_capability``), e.g. ``"AVX512"``."""
    get = getattr(torch.backends.cpu, "get_cpu_capability", None)
    return str(get()) if callable(get) else "unknown"


def mkldnn_linear_available() -> bool:
    """True when this PyTorch build has oneDNN with its prepacked linear operators."""
    if not torch.backends.mkldnn.is_available():
        return False
    try:
        return all(hasattr(torch.ops.mkldnn, n) for n in ("_linear_pointwise", "_reorder_linear_weight"))
    except RuntimeError:
        return False


def cpu_bf16_native() -> bool:
    """Whether this CPU runs bfloat16 natively through oneDNN: AVX512-BF16 or AMX (x86), BF16 (Arm).

    False without oneDNN; without the instructions bf16 would be emulated, slower than fp32.
    """
    if not torch.backends.mkldnn.is_available():
        return False
    probes = [getattr(torch.cpu, n, None) for n in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    if any(callable(p) and bool(p()) for p in probes):
        return True
    return bool({"avx512_bf16", "amx_bf16", "bf16"} & cpu_flags())


def fp16_supported(device: Union[str, torch.device] = "cpu") -> bool:
    """Whether float16 inference runs natively (fast) on ``device``: any available CUDA GPU.

    On CPUs fp16 convolutions are emulated or converted by oneDNN (slower than fp32 on the x86 CPUs
    measured), so False; bf16 is the CPU's half precision.
    """
    device = torch.device(device)
    return device.type == "cuda" and torch.cuda.is_available()


def bf16_supported(device: Union[str, torch.device] = "cpu") -> bool:
    """Whether bfloat16 runs natively (fast) on ``device``.

    CPU: :func:`cpu_bf16_native`. CUDA: a GPU with native bf16 (Ampere or newer). Other devices:
    False. ``DETKIT_DISABLE_BF16=1`` in the environment forces False (as on a CPU without bf16).
    """
    device = torch.device(device)
    if os.environ.get("DETKIT_DISABLE_BF16", "") == "1":
        return False
    if device.type == "cpu":
        return cpu_bf16_native()
    if device.type == "cuda":
        if not torch.cuda.is_available():
            return False
        try:
            return bool(torch.cuda.is_bf16_supported(including_emulation=False))
        except TypeError:  # older signature
            return bool(torch.cuda.is_bf16_supported())
    return False


def torchvision_version() -> str:
    """``torchvision.__version__``, or ``"not installed"``."""
    try:
        import torchvision
    except ImportError:
        return "not installed"
    return torchvision.__version__


@dataclass(frozen=True)
class GpuInfo:
    """One CUDA device: ``index``, ``name``, ``memory_gib`` (total memory, GiB)."""

    index: int
    name: str
    memory_gib: float


def gpu_info() -> tuple[GpuInfo, ...]:
    """The visible CUDA devices (empty without CUDA)."""
    if not torch.cuda.is_available():
        return ()
    props = [torch.cuda.get_device_properties(i) for i in range(torch.cuda.device_count())]
    return tuple(GpuInfo(i, p.name, p.total_memory / 2**30) for i, p in enumerate(props))


@dataclass(frozen=True)
class MachineInfo:
    """The machine and the software, as benchmarks report them.

    Attributes:
        cpu: CPU model name; logical_cpus: ``os.cpu_count()``; usable_cpus: those this process may
        use; physical_cores: None where unknown; speed_flags: the :data:`SPEED_FLAGS` present;
        cpu_capability: the ISA of PyTorch's CPU kernels; bf16_native: :func:`cpu_bf16_native`;
        system: OS name and release; python, torch, torchvision: versions; threads: PyTorch's
        intra-op threads; cuda: the CUDA version PyTorch was built with (None: CPU build);
        gpus: the visible CUDA devices.
    """

    cpu: str
    logical_cpus: int
    usable_cpus: int
    physical_cores: Optional[int]
    speed_flags: tuple[str, ...]
    cpu_capability: str
    bf16_native: bool
    system: str
    python: str
    torch: str
    torchvision: str
    threads: int
    cuda: Optional[str]
    gpus: tuple[GpuInfo, ...]

    def matmul_flags(self) -> tuple[str, ...]:
        """The bf16 / AMX / VNNI flags present (:data:`MATMUL_FLAGS`)."""
        return tuple(f for f in self.speed_flags if f in MATMUL_FLAGS)

    def cpu_summary(self) -> str:
        """``"<model> (<N> CPUs; <bf16/AMX/VNNI flags>)"``, one line for a benchmark header."""
        flags = " ".join(self.matmul_flags()) or "no bf16/AMX/VNNI flags"
        return f"{self.cpu} ({self.logical_cpus} CPUs; {flags})"


def machine_info() -> MachineInfo:
    """Collect :class:`MachineInfo` now (threads and GPUs as they are at this call)."""
    return MachineInfo(
        cpu=cpu_model_name(),
        logical_cpus=os.cpu_count() or 0,
        usable_cpus=usable_cpu_count(),
        physical_cores=physical_core_count(),
        speed_flags=cpu_speed_flags(),
        cpu_capability=cpu_capability(),
        bf16_native=cpu_bf16_native(),
        system=f"{platform.system()} {platform.release()}",
        python=platform.python_version(),
        torch=torch.__version__,
        torchvision=torchvision_version(),
        threads=torch.get_num_threads(),
        cuda=torch.version.cuda,
        gpus=gpu_info(),
    )


def resolve_device(name: str, flag: str = "--device") -> torch.device:
    """A device name given by the user (``cpu``, ``cuda``, ``cuda:1``) as a :class:`torch.device`;
    a one-line :class:`UsageError` naming ``flag`` for a bad name or CUDA on a machine without it."""
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UsageError(f"{flag} {name}: not a device name; use cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"{flag} {name}: CUDA is not available on this machine; use {flag} cpu")
    return device


#: glibc ``mallopt`` parameters (malloc.h) and the largest mmap threshold it accepts on 64-bit
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_MMAP_THRESHOLD_MAX = 32 << 20


@functools.lru_cache(maxsize=1)
def keep_freed_memory() -> bool:
    """Make glibc's malloc keep freed memory for reuse instead of returning it to the OS, for this
    process: blocks up to 32 MiB come from the heap (not a fresh ``mmap``) and the heap is trimmed
    only when 2 GiB at its top are free. Returns whether it applied (glibc on Linux, and
    ``DETKIT_KEEP_FREED_MEMORY`` not ``0``).

    Why: a detector's large activations (R50-FPN at 800 px: 31 MB per P2-sized bf16 map) are
    allocated and freed on every call. By default glibc serves each from a fresh ``mmap`` and
    unmaps it on free, so every call page-faults them in again: 23-28 k minor faults and 0.06-0.08 s
    of system time per image, measured on a 2-core AMD EPYC, where this setting made bf16 inference
    2-6 % faster (three process pairs). The cost: the process keeps its peak heap after a burst of
    allocations instead of shrinking. The same as ``MALLOC_MMAP_THRESHOLD_=33554432
    MALLOC_TRIM_THRESHOLD_=2147483647`` in the environment.
    """
    if os.environ.get("DETKIT_KEEP_FREED_MEMORY", "") == "0" or platform.system() != "Linux":
        return False
    import ctypes

    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (musl, ...): nothing to tune
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    # mallopt returns 1 on success (0 for a value out of range); the trim threshold: the largest int
    return bool(mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_MAX)) and bool(mallopt(_M_TRIM_THRESHOLD, 2**31 - 1))


def release_freed_memory() -> bool:
    """Return the memory this process has freed to the OS now (glibc's ``malloc_trim(0)``); whether it ran.

    Why: parsing a large JSON file (COCO train2017: gigabytes of Python objects) leaves the freed
    memory in the process's heap, resident, where the data-loading workers forked later share it
    for nothing; ``load_coco`` calls this once the file's objects are gone.
    """
    if platform.system() != "Linux":
        return False
    import ctypes

    try:
        trim = ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc
        return False
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    trim(0)
    return True
