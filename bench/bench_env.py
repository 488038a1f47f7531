"""Where a benchmark ran: machine, library versions, git commit, load average (and waiting for a quiet machine)."""
from __future__ import annotations

import os
import platform
import subprocess
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine_info(device: str = "cpu") -> dict[str, Any]:
    info = {"platform": platform.platform(), "cpu": cpu_model(), "cores": os.cpu_count(),
            "python": platform.python_version(), "device": device}
    try:
        import torch
        info["threads"] = torch.get_num_threads()
        if device == "cuda" and torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name(0)
    except Exception:  # noqa: BLE001
        pass
    return info


def dist_version(name: str) -> str | None:
    try:
        from importlib.metadata import version
        return version(name)
    except Exception:  # noqa: BLE001
        return None


def versions() -> dict[str, str | None]:
    out = {}
    for mod in ("torch", "triton", "transformers"):
        try:
            out[mod] = __import__(mod).__version__
        except Exception:  # noqa: BLE001
            out[mod] = None
    out["liger_kernel"] = dist_version("liger-kernel") or dist_version("liger_kernel")
    out["cut_cross_entropy"] = dist_version("cut-cross-entropy")
    return out


def git_sha() -> str | None:
    try:
        r = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                           text=True, timeout=10)
        return r.stdout.strip() or None
    except Exception:  # noqa: BLE001
        return None


def load1() -> float | None:
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None


def wait_quiet(threshold: float = 0.7, poll_s: float = 15.0, max_wait_s: float = 1200.0) -> dict[str, Any]:
    """Wait until the 1-minute load average is below `threshold`; returns what was seen."""
    t0 = time.monotonic()
    first = load1()
    cur = first
    while cur is not None and cur >= threshold and time.monotonic() - t0 < max_wait_s:
        time.sleep(poll_s)
        cur = load1()
    quiet = cur is not None and cur < threshold
    return {"load1_first": first, "load1_last": cur, "waited_s": round(time.monotonic() - t0, 1),
            "quiet": quiet}
