"""Where, in which precision and at what cost a command computes: the one resolution of ``--device`` and
``--dtype``, peak memory and stage times."""

import resource
import time

import torch

from .errors import MLAError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def source_dtype(src_config) -> torch.dtype:
    """The dtype the source's config declares (float32 when it declares none we know)."""
    dtype = getattr(src_config, "dtype", None) or getattr(src_config, "torch_dtype", None)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, None)
    return dtype if dtype in DTYPES.values() else torch.float32


def resolve_device(name: str, option: str = "--device ") -> torch.device:
    """``auto`` (CUDA when present), ``cpu`` or ``cuda``; MLAError when CUDA is asked for and absent. ``option`` is
    how the user spelled the setting (``--device `` on the command line, ``device=`` in a recipe)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise MLAError(f"{option}cuda: no CUDA device is available here (torch.cuda.is_available() is False); "
                       f"use {option}cpu")
    return torch.device(name)


def compute_dtype(device: torch.device, src_config) -> torch.dtype:
    """float32 on CPU; on a GPU the source's own half precision (statistics are float64 either way)."""
    src = source_dtype(src_config)
    return src if device.type == "cuda" and src in (torch.bfloat16, torch.float16) else torch.float32


def peak_rss_bytes() -> int:
    """This process's own peak resident memory, in bytes: ``VmHWM`` of ``/proc/self/status`` (its address space since
    it started), else ``getrusage``. On Linux ``ru_maxrss`` of a child started with vfork/posix_spawn (as Python's
    ``subprocess`` does) starts from its parent's peak, which would overstate a small child's."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def reset_peak_memory(device: torch.device) -> None:
    """Start the peaks ``peak_memory`` reports afresh: the process's ``VmHWM`` (``/proc/self/clear_refs``; kept where
    that cannot be written) and CUDA's peak allocation."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory(device: torch.device) -> dict:
    """Peak resident memory of this process so far (and of the GPU when used), in bytes."""
    out = {"peak_rss_bytes": peak_rss_bytes()}
    if device.type == "cuda":
        out["peak_cuda_bytes"] = int(torch.cuda.max_memory_allocated(device))
    return out


def device_name(name: str) -> str:
    """``resolve_device`` as a string (``cpu``, ``cuda``, ``cuda:1``)."""
    return str(resolve_device(name))


def auto_dtype(name: str, device: str) -> str:
    """``--dtype``: ``auto`` is bfloat16 on a GPU and float32 on the CPU; any other name is kept."""
    if name != "auto":
        return name
    return "bfloat16" if str(device).startswith("cuda") else "float32"


def export_dtype(name: str, src_config) -> torch.dtype:
    """``--dtype`` of the export: ``auto`` is the source's own dtype."""
    return DTYPES[name] if name != "auto" else source_dtype(src_config)


class StageClock:
    """Seconds per named stage of one run (``lap`` adds the time since the previous lap to a stage)."""

    def __init__(self):
        self.started = self.last = time.time()
        self.stages: dict[str, float] = {}

    def lap(self, name: str) -> None:
        now = time.time()
        self.stages[name] = round(self.stages.get(name, 0.0) + now - self.last, 2)
        self.last = now

    def elapsed(self) -> float:
        return round(time.time() - self.started, 1)
