"""The one benchmark harness of `pytest bench/`.

A benchmark module supplies a list of `Case`s and a function `build(case)` that creates the inputs
of one case and returns a zero-argument callable, or a dict {"fn": callable, "check": ..., "reset": ...}:
`check()` returns a dict of floats computed from the last call (loss value, gradient norms, ...) used to
cross-check that the providers agree with the naive baseline; `reset()` drops what a call leaves
behind (gradients), so that it is counted in the peak of every timed call rather than in the baseline;
`warmup` (optional) is a cheaper call that exercises the same code paths, used instead of `fn` for the
warm-up when a full call takes minutes. `run_cases` runs every case in its OWN subprocess, so that peak memory is
measured per provider on a clean process:

  1. the worker imports the benchmark module and calls `build(case)`: inputs are created here and
     belong to the baseline;
  2. `warmup` calls (compilation, autotuning, lazy initialisation), `reset()`, then the allocator is
     trimmed (`malloc_trim`) so that memory cached by the warm-up does not hide later allocations;
  3. baseline = resident set size (CPU) or `torch.cuda.memory_allocated` (CUDA); the peak counter is
     reset (`/proc/self/clear_refs` <- 5 resets VmHWM; a 1 ms sampling thread where that fails;
     `torch.cuda.reset_peak_memory_stats` on CUDA);
  4. `repeats` timed calls (perf_counter, CUDA synchronised); median time; peak extra memory =
     peak - baseline over the timed calls.

Results are printed as a table, appended as JSON lines to bench/results/<bench>.jsonl (machine,
versions, git sha, timestamp, shape, dtype, mode, provider, median_s, peak_mb, ...) and written as a
markdown table to bench/results/<bench>_<cpu|cuda>.md (overwritten by every run).

Run as a script only as a worker: `python harness.py --worker <module.py> <case json>`.
"""
from __future__ import annotations

import ctypes
import datetime as _dt
import gc
import importlib.util
import json
import os
import platform
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
RESULTS_DIR = Path(os.environ.get("FASTPRERL_BENCH_RESULTS", BENCH_DIR / "results"))
MARK = "@@BENCH_RESULT@@ "
MiB = float(1 << 20)


class Skip(Exception):
    """Raised by `build` when a provider cannot run here; the reason is shown in the table."""


@dataclass
class Case:
    bench: str                      # results file stem, e.g. "logprob"
    provider: str                   # what `build` runs, e.g. "naive", "fastprerl_torch_logprobs"
    shape_label: str                # e.g. "smollm2-135m N=4096"
    shape: Dict[str, Any]           # numbers the benchmark needs (N, H, V, ...)
    dtype: str = "float32"
    mode: str = "fwd+bwd"           # "fwd" (no grad) or "fwd+bwd"
    params: Dict[str, Any] = field(default_factory=dict)
    repeats: int = 3
    warmup: int = 1
    timeout_s: float = 900.0
    est_bytes: int = 0              # rough peak need, to skip cases that cannot fit
    flops: float = 0.0              # useful FLOPs of one call (GFLOP/s column), 0 = unknown
    baseline: str = "naive"         # name (label or provider) the time ratio is taken against
    device: str = "cpu"
    label: str = ""                 # name shown in the table (default: provider)
    note: str = ""                  # shown in the table's note column

    @property
    def name(self) -> str:
        return self.label or self.provider


# ----------------------------------------------------------------------------------------------
# machine / versions
# ----------------------------------------------------------------------------------------------
def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine_info(device: str = "cpu") -> Dict[str, Any]:
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


def _dist_version(name: str) -> Optional[str]:
    try:
        from importlib.metadata import version
        return version(name)
    except Exception:  # noqa: BLE001
        return None


def versions() -> Dict[str, Optional[str]]:
    out = {}
    for mod in ("torch", "triton", "transformers"):
        try:
            out[mod] = __import__(mod).__version__
        except Exception:  # noqa: BLE001
            out[mod] = None
    out["liger_kernel"] = _dist_version("liger-kernel") or _dist_version("liger_kernel")
    out["cut_cross_entropy"] = _dist_version("cut-cross-entropy")
    return out


def git_sha() -> Optional[str]:
    try:
        r = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                           text=True, timeout=10)
        return r.stdout.strip() or None
    except Exception:  # noqa: BLE001
        return None


def load1() -> Optional[float]:
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None


def wait_quiet(threshold: float = 0.7, poll_s: float = 15.0, max_wait_s: float = 1200.0) -> Dict[str, Any]:
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


# ----------------------------------------------------------------------------------------------
# kernels import (works installed, and from a bare checkout with PYTHONPATH=.)
# ----------------------------------------------------------------------------------------------
def import_kernels():
    """`fastprerl.kernels`, also from a checkout that is not pip-installed (kernels/ is mapped to
    fastprerl.kernels by the package metadata; without installation it is loaded from its folder)."""
    try:
        import fastprerl.kernels as k
        return k
    except ImportError:
        pass
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    import fastprerl
    spec = importlib.util.spec_from_file_location(
        "fastprerl.kernels", REPO / "kernels" / "__init__.py",
        submodule_search_locations=[str(REPO / "kernels")])
    mod = importlib.util.module_from_spec(spec)
    sys.modules["fastprerl.kernels"] = mod
    spec.loader.exec_module(mod)
    fastprerl.kernels = mod
    return mod


# ----------------------------------------------------------------------------------------------
# memory measurement
# ----------------------------------------------------------------------------------------------
def _status_kb(field_name: str) -> Optional[int]:
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


def _reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        hwm, rss = _status_kb("VmHWM"), _status_kb("VmRSS")
        return hwm is not None and rss is not None and hwm <= rss + 1024
    except OSError:
        return False


class _RssSampler:
    """Fallback peak-RSS meter: samples VmRSS every millisecond in a thread."""

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
            read = lambda: _status_kb("VmRSS") or 0  # noqa: E731
        while not self._stop.is_set():
            self.peak = max(self.peak, read())
            time.sleep(0.001)

    def __enter__(self):
        self._t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()


class PeakMeter:
    """Peak extra memory over a baseline taken at construction (after inputs and warm-up)."""

    def __init__(self, device: str):
        self.device = device
        self.method = None
        if device == "cuda":
            import torch
            torch.cuda.synchronize()
            self.base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            self.method = "cuda.max_memory_allocated"
            return
        self.base = (_status_kb("VmRSS") or 0) * 1024
        if _reset_hwm():
            self.method = "VmHWM (clear_refs)"
            self._sampler = None
        else:
            self.method = "VmRSS sampled 1 ms"
            self._sampler = _RssSampler().__enter__()

    def peak_extra_mb(self) -> float:
        if self.device == "cuda":
            import torch
            torch.cuda.synchronize()
            return (torch.cuda.max_memory_allocated() - self.base) / MiB
        if self._sampler is not None:
            self._sampler.__exit__(None, None, None)
            peak = self._sampler.peak * 1024
        else:
            peak = (_status_kb("VmHWM") or 0) * 1024
        return max(0.0, (peak - self.base) / MiB)


# ----------------------------------------------------------------------------------------------
# worker
# ----------------------------------------------------------------------------------------------
def _sync(device: str):
    if device == "cuda":
        import torch
        torch.cuda.synchronize()


def _worker(module_path: str, case_json: str) -> Dict[str, Any]:
    case = Case(**json.loads(case_json))
    out: Dict[str, Any] = {"status": "ok"}
    sys.path.insert(0, str(BENCH_DIR))
    spec = importlib.util.spec_from_file_location("_bench_module", module_path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    try:
        built = mod.build(case)
    except Skip as e:
        return {"status": "skipped", "reason": str(e)}
    if callable(built):
        built = {"fn": built}
    fn, check, reset = built["fn"], built.get("check"), built.get("reset")
    warm = built.get("warmup") or fn
    for _ in range(case.warmup):
        warm()
        _sync(case.device)
    if reset is not None:
        reset()
    gc.collect()
    malloc_trim()
    ru0 = os.times()
    meter = PeakMeter(case.device)
    times = []
    for _ in range(case.repeats):
        t0 = time.perf_counter()
        fn()
        _sync(case.device)
        times.append(time.perf_counter() - t0)
    peak = meter.peak_extra_mb()
    ru1 = os.times()
    cpu_s = (ru1.user - ru0.user) + (ru1.system - ru0.system)
    out.update(times_s=[round(t, 5) for t in times], median_s=statistics.median(times),
               peak_mb=round(peak, 1), mem_method=meter.method,
               cpu_util=round(cpu_s / max(sum(times), 1e-9), 2))
    if check is not None:
        try:
            out["check"] = {k: float(v) for k, v in check().items()}
        except Exception as e:  # noqa: BLE001
            out["check_error"] = f"{type(e).__name__}: {e}"
    return out


# ----------------------------------------------------------------------------------------------
# parent
# ----------------------------------------------------------------------------------------------
def _available_bytes() -> Optional[int]:
    try:
        import psutil
        return int(psutil.virtual_memory().available)
    except ImportError:
        kb = None
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                kb = int(line.split()[1])
        return kb * 1024 if kb else None


def run_case(module_path: str, case: Case) -> Dict[str, Any]:
    if case.device == "cpu" and case.est_bytes:
        avail = _available_bytes()
        if avail is not None and case.est_bytes > 0.8 * avail:
            return {"status": "skipped", "reason": f"needs ~{case.est_bytes / 2**30:.1f} GiB, "
                                                   f"{avail / 2**30:.1f} GiB available"}
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), str(BENCH_DIR)] +
                                        ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", str(module_path),
           json.dumps(asdict(case))]
    t0 = time.monotonic()
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=case.timeout_s, env=env,
                           cwd=str(REPO))
    except subprocess.TimeoutExpired:
        return {"status": "error", "reason": f"timed out after {case.timeout_s:.0f} s"}
    wall = time.monotonic() - t0
    for line in r.stdout.splitlines():
        if line.startswith(MARK):
            res = json.loads(line[len(MARK):])
            res["process_wall_s"] = round(wall, 1)
            return res
    tail = (r.stderr or r.stdout).strip().splitlines()[-6:]
    reason = " | ".join(tail)[-600:] or f"worker exited with code {r.returncode}"
    if r.returncode < 0 or r.returncode == 137:
        reason = f"killed (signal {-r.returncode if r.returncode < 0 else 9}, out of memory?) " + reason
    return {"status": "error", "reason": reason}


def _fmt_time(x):
    return "-" if x is None else (f"{x:.3f}" if x < 10 else f"{x:.2f}")


def _rows_for_table(results: List[Dict[str, Any]]):
    rows = []
    for r in results:
        ok = r["status"] == "ok"
        gf = (r["flops"] / r["median_s"] / 1e9) if ok and r.get("flops") else None
        rows.append([r["provider"], r["shape"], r["dtype"], r["mode"],
                     _fmt_time(r.get("median_s")) if ok else r["status"],
                     f"{r['peak_mb']:.0f}" if ok else "-",
                     f"{r['ratio_vs_naive']:.2f}" if r.get("ratio_vs_naive") is not None else "-",
                     f"{gf:.0f}" if gf else "-",
                     (r.get("note") or "") + ("" if ok else (r.get("reason") or ""))])
    return rows


HEADER = ["provider", "shape", "dtype", "mode", "median s", "peak MB extra", "x naive", "GFLOP/s", "note"]


def format_table(results: List[Dict[str, Any]], markdown: bool = False, ratio_label: str = "x naive") -> str:
    rows = _rows_for_table(results)
    header = [ratio_label if h == "x naive" else h for h in HEADER]
    if markdown:
        esc = lambda s: str(s).replace("|", "\\|")  # noqa: E731
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        lines += ["| " + " | ".join(esc(c) for c in row) + " |" for row in rows]
        return "\n".join(lines)
    widths = [max(len(header[i]), *(len(str(row[i])) for row in rows)) if rows else len(header[i])
              for i in range(len(header) - 1)]
    fmt = lambda row: "  ".join(str(c).ljust(w) for c, w in zip(row[:-1], widths)) + "  " + str(row[-1])  # noqa: E731
    return "\n".join([fmt(header), fmt(["-" * w for w in widths] + ["----"])] + [fmt(r) for r in rows])


def _agreement_notes(results: List[Dict[str, Any]], rtol: float = 2e-3):
    """Flag providers whose check values differ from the baseline provider's (same shape, dtype, mode)."""
    by = {}
    for r in results:
        by.setdefault((r["shape"], r["dtype"], r["mode"], r["baseline"]), []).append(r)
    for (_, _, _, baseline), group in by.items():
        ref = next((r for r in group if r.get("check") and r["provider"] == baseline), None)
        if ref is None:
            continue
        for r in group:
            if r is ref or not r.get("check"):
                continue
            bad = []
            for k, v in r["check"].items():
                if k in ref["check"]:
                    a = ref["check"][k]
                    if abs(v - a) > rtol * max(abs(a), 1e-6):
                        bad.append(f"{k} {v:.6g} vs {a:.6g}")
            if bad:
                r["mismatch"] = bad
                r["note"] = (r.get("note") or "") + f"MISMATCH vs {ref['provider']}: " + "; ".join(bad) + " "


def run_cases(module_path: str, cases: List[Case], *, bench: Optional[str] = None,
              title: str = "", extra_md: str = "", ratio_label: str = "x naive",
              verbose: bool = True) -> List[Dict[str, Any]]:
    """Run every case in its own subprocess; print, append JSONL, write the markdown table."""
    if not cases:
        return []
    bench = bench or cases[0].bench
    device = cases[0].device
    meta = {"machine": machine_info(device), "versions": versions(), "git_sha": git_sha()}
    results = []
    for c in cases:
        l0 = load1()
        if verbose:
            print(f"  [{bench}] {c.name:<34} {c.shape_label:<28} {c.dtype:<8} {c.mode:<8} ...",
                  end="", flush=True)
        res = run_case(module_path, c)
        res.update(bench=bench, provider=c.name, impl=c.provider, shape=c.shape_label, shape_params=c.shape,
                   dtype=c.dtype, mode=c.mode, params=c.params, repeats=c.repeats, warmup=c.warmup,
                   flops=c.flops, baseline=c.baseline, quick=is_quick(), load1_before=l0, load1_after=load1(),
                   timestamp=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), **meta)
        if c.note:
            res["note"] = c.note + " "
        if verbose:
            msg = (f" {res['median_s']:.3f} s  +{res['peak_mb']:.0f} MB" if res["status"] == "ok"
                   else f" {res['status']}: {res.get('reason', '')[:200]}")
            print(msg, flush=True)
        results.append(res)
    # ratios vs the baseline provider of the same shape/dtype/mode
    for r in results:
        if r["status"] != "ok":
            continue
        base = next((b for b in results if b["provider"] == r["baseline"] and b["shape"] == r["shape"]
                     and b["dtype"] == r["dtype"] and b["mode"] == r["mode"] and b["status"] == "ok"), None)
        r["ratio_vs_naive"] = r["median_s"] / base["median_s"] if base else None
    _agreement_notes(results)
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    with open(RESULTS_DIR / f"{bench}.jsonl", "a") as f:
        for r in results:
            f.write(json.dumps(r, default=str) + "\n")
    write_markdown(bench, device, results, meta, title=title, extra=extra_md, ratio_label=ratio_label)
    if verbose:
        print()
        print(f"== {title or bench} ({meta['machine']['cpu']}, {meta['machine']['cores']} cores, "
              f"torch {meta['versions']['torch']}, git {meta['git_sha']}) ==")
        print(format_table(results, ratio_label=ratio_label))
        print()
    return results


def is_quick() -> bool:
    return os.environ.get("FASTPRERL_BENCH_QUICK", "") not in ("", "0")


def write_markdown(bench: str, device: str, results, meta, title: str = "", extra: str = "",
                   ratio_label: str = "x naive") -> Path:
    """bench/results/<bench>_<cpu|cuda>.md; a --quick smoke run writes <bench>_<cpu|cuda>_quick.md
    instead, so that it never overwrites the table of a real run."""
    suffix = "_quick" if is_quick() else ""
    path = RESULTS_DIR / f"{bench}_{'cuda' if device == 'cuda' else 'cpu'}{suffix}.md"
    m, v = meta["machine"], meta["versions"]
    when = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    lines = [f"# {title or bench}", "",
             f"- machine: {m['platform']}; {m['cpu']}; {m['cores']} cores; torch threads {m.get('threads')}"
             + (f"; GPU {m['gpu']}" if m.get("gpu") else ""),
             "- versions: " + ", ".join(f"{k} {val}" for k, val in v.items() if val),
             f"- git: {meta['git_sha']}; written {when}",
             f"- load average (1 min) before the first / after the last case: "
             f"{results[0].get('load1_before')} / {results[-1].get('load1_after')}",
             "- median of the timed repeats after warm-up; peak MB extra = peak over the timed repeats "
             "minus the baseline after inputs (RSS on CPU, allocated bytes on CUDA); "
             f"{ratio_label} = time / time of the baseline provider of the same shape and mode; "
             "GFLOP/s counts the useful matmul FLOPs only.", ""]
    lines.append(format_table(results, markdown=True, ratio_label=ratio_label))
    if extra:
        lines += ["", extra]
    path.write_text("\n".join(lines) + "\n")
    return path


def find(results, provider: str, shape: Optional[str] = None, mode: Optional[str] = None,
         dtype: Optional[str] = None) -> Optional[Dict[str, Any]]:
    for r in results:
        if (r["provider"] == provider and r["status"] == "ok" and (shape is None or r["shape"] == shape)
                and (mode is None or r["mode"] == mode) and (dtype is None or r["dtype"] == dtype)):
            return r
    return None


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--worker":
        sys.path.insert(0, str(BENCH_DIR))
        import harness as _h  # the module the benchmarks import (its Skip class), not __main__
        try:
            result = _h._worker(sys.argv[2], sys.argv[3])
        except Exception as e:  # noqa: BLE001
            import traceback
            traceback.print_exc()
            result = {"status": "error", "reason": f"{type(e).__name__}: {e}"[:600]}
        sys.stdout.flush()
        print(MARK + json.dumps(result), flush=True)
        sys.exit(0)
    print(__doc__)
    sys.exit(2)
