"""The one benchmark runner of `pytest bench/`: cases, one subprocess per case, timing, the oracle check.

A benchmark module supplies a list of `Case`s and a function `build(case)` that creates the inputs of one case
and returns a zero-argument callable, or a dict {"fn": callable, "reset": ..., "warmup": ..., "outputs": ...,
"oracle": ...}: `reset()` drops what a call leaves behind (gradients), so that it is counted in the peak of
every timed call rather than in the baseline; `warmup` (optional) is a cheaper call that exercises the same
code paths, used instead of `fn` for the warm-up when a full call takes minutes; `outputs()` returns the full
outputs of the last call (a dict of tensors: log-probs, loss, gradients) and `oracle()` returns (float64
oracle, naive same-dtype yardstick, dtype) for the same quantities (bench/bench_oracle.py). `run_cases` runs
every case in its OWN subprocess, so that peak memory is measured per provider on a clean process:

  1. the worker imports the benchmark module and calls `build(case)`: inputs are created here and
     belong to the baseline;
  2. `warmup` calls (compilation, autotuning, lazy initialisation), `reset()`, then gc + malloc_trim so
     that memory cached by the warm-up does not hide later allocations;
  3. the peak meter starts (bench/bench_memory.py: RSS on CPU, allocated bytes on CUDA);
  4. `repeats` timed calls (perf_counter, CUDA synchronised); median time; peak extra memory =
     peak - baseline over the timed calls;
  5. the outputs of the last call are checked against the oracle with the bound of tests/tolerances.py.
     A case with `checked=True` (the default) whose check fails, or whose outputs cannot be checked, fails the
     benchmark: `run_cases` raises `CheckFailed` after writing the results.

Results are printed as a table, appended as JSON lines to bench/results/<bench>.jsonl (machine,
versions, git sha, timestamp, shape, dtype, mode, provider, median_s, peak_mb, check, ...) and written as a
markdown table to bench/results/<bench>_<cpu|cuda>.md (overwritten by every run; bench/bench_report.py).

Run as a script only as a worker: `python harness.py --worker <module.py> <case json>`.
"""
from __future__ import annotations

import datetime as _dt
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from bench_env import dist_version, git_sha, load1, machine_info, versions, wait_quiet  # noqa: F401 (re-exported)
from bench_memory import PeakMeter
from bench_oracle import CACHE_ENV
from bench_report import format_table, is_quick, write_markdown  # noqa: F401 (re-exported)

_dist_version = dist_version   # the name bench/test_e2e_trl_bench.py uses
BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
RESULTS_DIR = Path(os.environ.get("FASTPRERL_BENCH_RESULTS", BENCH_DIR / "results"))
MARK = "@@BENCH_RESULT@@ "


class Skip(Exception):
    """Raised by `build` when a provider cannot run here; the reason is shown in the table."""


class CheckFailed(AssertionError):
    """Raised by `run_cases` (after writing the results) when a checked case failed its oracle check."""


@dataclass
class Case:
    bench: str                      # results file stem, e.g. "logprob"
    provider: str                   # what `build` runs, e.g. "naive", "fastprerl_torch_logprobs"
    shape_label: str                # e.g. "smollm2-135m N=4096"
    shape: dict[str, Any]           # numbers the benchmark needs (N, H, V, ...)
    dtype: str = "float32"
    mode: str = "fwd+bwd"           # "fwd" (no grad) or "fwd+bwd"
    params: dict[str, Any] = field(default_factory=dict)
    repeats: int = 3
    warmup: int = 1
    timeout_s: float = 900.0
    est_bytes: int = 0              # rough peak need, to skip cases that cannot fit
    flops: float = 0.0              # useful FLOPs of one call (GFLOP/s column), 0 = unknown
    baseline: str = "naive"         # name (label or provider) the time ratio is taken against
    device: str = "cpu"
    label: str = ""                 # name shown in the table (default: provider)
    note: str = ""                  # shown in the table's note column
    checked: bool = True            # a failed oracle check of this case fails the benchmark (peers: False)

    @property
    def name(self) -> str:
        return self.label or self.provider


# ----------------------------------------------------------------------------------------------
# kernels import (works installed, and from a bare checkout with PYTHONPATH=.)
# ----------------------------------------------------------------------------------------------
def import_kernels():
    """`fastprerl.kernels`, installed or from a bare checkout (PYTHONPATH=. or not): the package finds the
    top-level kernels/ folder itself, so only the checkout has to be importable."""
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    import fastprerl.kernels as k
    return k


# ----------------------------------------------------------------------------------------------
# worker
# ----------------------------------------------------------------------------------------------
def _sync(device: str):
    if device == "cuda":
        import torch
        torch.cuda.synchronize()


def _worker(module_path: str, case_json: str) -> dict[str, Any]:
    case = Case(**json.loads(case_json))
    out: dict[str, Any] = {"status": "ok"}
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
    fn, reset = built["fn"], built.get("reset")
    warm = built.get("warmup") or fn
    for _ in range(case.warmup):
        warm()
        _sync(case.device)
    if reset is not None:
        reset()
    ru0 = os.times()
    meter = PeakMeter(case.device)     # gc + malloc_trim, then the baseline
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
    if built.get("outputs") is not None:
        out["check"] = _oracle_check(built)
    return out


def _oracle_check(built) -> dict[str, Any]:
    """The outputs of the last call against the oracle; {"ok": False, "error": ...} when that fails to run."""
    import bench_oracle
    try:
        got = built["outputs"]()
        oracle, naive, dtype = built["oracle"]()
        res = bench_oracle.check(got, oracle, naive, dtype)
        res["failures"] = bench_oracle.failures(res)
        return res
    except Exception as e:  # noqa: BLE001  reported, and a checked case fails on it
        return {"ok": False, "error": f"{type(e).__name__}: {e}"[:600]}


# ----------------------------------------------------------------------------------------------
# parent
# ----------------------------------------------------------------------------------------------
def _available_bytes() -> int | None:
    try:
        import psutil
        return int(psutil.virtual_memory().available)
    except ImportError:
        kb = None
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                kb = int(line.split()[1])
        return kb * 1024 if kb else None


def run_case(module_path: str, case: Case, oracle_cache: str | None = None) -> dict[str, Any]:
    if case.device == "cpu" and case.est_bytes:
        avail = _available_bytes()
        if avail is not None and case.est_bytes > 0.8 * avail:
            return {"status": "skipped", "reason": f"needs ~{case.est_bytes / 2**30:.1f} GiB, "
                                                   f"{avail / 2**30:.1f} GiB available"}
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), str(BENCH_DIR)] +
                                        ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    if oracle_cache:
        env.setdefault(CACHE_ENV, oracle_cache)
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


def run_cases(module_path: str, cases: list[Case], *, bench: str | None = None,
              title: str = "", extra_md: str = "", ratio_label: str = "x naive",
              verbose: bool = True) -> list[dict[str, Any]]:
    """Run every case in its own subprocess; print, append JSONL, write the markdown table. Raises
    `CheckFailed` (after all that) if a case with `checked=True` failed its oracle check."""
    if not cases:
        return []
    bench = bench or cases[0].bench
    device = cases[0].device
    meta = {"machine": machine_info(device), "versions": versions(), "git_sha": git_sha()}
    results = []
    cache = tempfile.TemporaryDirectory(prefix="fastprerl-oracle-")
    for c in cases:
        l0 = load1()
        if verbose:
            print(f"  [{bench}] {c.name:<34} {c.shape_label:<28} {c.dtype:<8} {c.mode:<8} ...",
                  end="", flush=True)
        res = run_case(module_path, c, cache.name)
        res.update(bench=bench, provider=c.name, impl=c.provider, shape=c.shape_label, shape_params=c.shape,
                   dtype=c.dtype, mode=c.mode, params=c.params, repeats=c.repeats, warmup=c.warmup,
                   flops=c.flops, baseline=c.baseline, quick=is_quick(), load1_before=l0, load1_after=load1(),
                   timestamp=_dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"), **meta)
        if c.note:
            res["note"] = c.note + " "
        if verbose:
            msg = (f" {res['median_s']:.3f} s  +{res['peak_mb']:.0f} MB" if res["status"] == "ok"
                   else f" {res['status']}: {res.get('reason', '')[:200]}")
            print(msg, flush=True)
        results.append(res)
    cache.cleanup()
    # ratios vs the baseline provider of the same shape/dtype/mode
    for r in results:
        if r["status"] != "ok":
            continue
        base = next((b for b in results if b["provider"] == r["baseline"] and b["shape"] == r["shape"]
                     and b["dtype"] == r["dtype"] and b["mode"] == r["mode"] and b["status"] == "ok"), None)
        r["ratio_vs_naive"] = r["median_s"] / base["median_s"] if base else None
    failed = _mark_failed_checks(results, cases)
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    with open(RESULTS_DIR / f"{bench}.jsonl", "a") as f:
        for r in results:
            f.write(json.dumps(r, default=str) + "\n")
    write_markdown(RESULTS_DIR, bench, device, results, meta, title=title, extra=extra_md, ratio_label=ratio_label)
    if verbose:
        print()
        print(f"== {title or bench} ({meta['machine']['cpu']}, {meta['machine']['cores']} cores, "
              f"torch {meta['versions']['torch']}, git {meta['git_sha']}) ==")
        print(format_table(results, ratio_label=ratio_label))
        print()
    if failed:
        raise CheckFailed("oracle check failed: " + "; ".join(failed))
    return results


def _mark_failed_checks(results: list[dict[str, Any]], cases: list[Case]) -> list[str]:
    """Notes the failed oracle checks in the table; returns those of checked cases."""
    failed = []
    for r, c in zip(results, cases):
        chk = r.get("check")
        if r["status"] != "ok" or chk is None or chk.get("ok"):
            continue
        why = chk.get("error") or "; ".join(chk.get("failures", []))
        r["note"] = (r.get("note") or "") + f"ORACLE CHECK FAILED: {why} "
        if c.checked:
            failed.append(f"{r['provider']} {r['shape']} {r['dtype']} {r['mode']}: {why}")
    return failed


def find(results, provider: str, shape: str | None = None, mode: str | None = None,
         dtype: str | None = None) -> dict[str, Any] | None:
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
