"""Peak memory of a benchmark process: the one RSS meter of bench/ (the harness and the end-to-end workers use
it), and the CUDA allocator's peak.

CPU: baseline = resident set size after gc + malloc_trim; the peak is the kernel's high-water mark VmHWM after
a reset (/proc/self/clear_refs <- 5), or, where that reset does not work, VmRSS sampled every millisecond by
a thread. CUDA: torch.cuda.memory_allocated / max_memory_allocated after reset_peak_memory_stats.
"""
from __future__ import annotations

import ctypes
import gc
import threading
import time
from pathlib import Path
from typing import Any

MiB = float(1 << 20)


def status_kb(field_name: str) -> int | None:
    """A field of /proc/self/status in kB (VmRSS, VmHWM, ...), None where it cannot be read."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field_name + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def malloc_trim() -> None:
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except Exception:  # noqa: BLE001
        pass


def reset_hwm() -> bool:
    """Reset VmHWM to the current RSS; False where the kernel does not allow it."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        hwm, rss = status_kb("VmHWM"), status_kb("VmRSS")
        return hwm is not None and rss is not None and hwm <= rss + 1024
    except OSError:
        return False


class RssSampler:
    """Fallback peak-RSS meter: samples VmRSS every millisecond in a thread (peak in kB)."""

    def __init__(self):
        self.peak = 0
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        try:
            import psutil
            proc = psutil.Process()
            read = lambda: proc.memory_info().rss // 1024  # noqa: E731
        except ImportError:
            read = lambda: status_kb("VmRSS") or 0  # noqa: E731
        while not self._stop.is_set():
            self.peak = max(self.peak, read())
            time.sleep(0.001)

    def __enter__(self):
        self._t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()


class RssMeter:
    """Baseline RSS now (after gc + malloc_trim), then the peak (VmHWM after a reset, else a 1 ms sampler)."""

    def __init__(self):
        gc.collect()
        malloc_trim()
        self.base = (status_kb("VmRSS") or 0) * 1024
        self.hwm_before_reset = (status_kb("VmHWM") or 0) * 1024
        if reset_hwm():
            self.method, self._sampler = "VmHWM (clear_refs)", None
        else:
            self.method, self._sampler = "VmRSS sampled 1 ms", RssSampler().__enter__()
        self.peak: int | None = None

    def read_peak(self) -> int:
        """Peak RSS in bytes since construction (stops the sampler, if one runs)."""
        if self._sampler is not None:
            self._sampler.__exit__(None, None, None)
            self.peak = self._sampler.peak * 1024
        else:
            self.peak = (status_kb("VmHWM") or 0) * 1024
        return self.peak

    def summary(self) -> dict[str, Any]:
        peak = self.peak if self.peak is not None else self.read_peak()
        return {"rss_base_mb": round(self.base / MiB, 1), "peak_mb": round(peak / MiB, 1),
                "peak_extra_mb": round(max(0, peak - self.base) / MiB, 1),
                "load_peak_mb": round(self.hwm_before_reset / MiB, 1), "mem_method": self.method}


class PeakMeter:
    """Peak extra memory over a baseline taken at construction (after inputs and warm-up)."""

    def __init__(self, device: str):
        self.device = device
        if device == "cuda":
            import torch
            torch.cuda.synchronize()
            self.base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            self.method = "cuda.max_memory_allocated"
            return
        self._rss = RssMeter()
        self.base, self.method = self._rss.base, self._rss.method

    def peak_extra_mb(self) -> float:
        if self.device == "cuda":
            import torch
            torch.cuda.synchronize()
            return (torch.cuda.max_memory_allocated() - self.base) / MiB
        return max(0.0, (self._rss.read_peak() - self.base) / MiB)
