"""GPU check of the fused log-prob op: correctness at real shapes, then the benchmark.

    bash bench/gpu_check.sh OUT_DIR          (from the repo root, on a CUDA machine: this and the rest)
    PYTHONPATH=. python bench/gpu_check.py [--out DIR] [--budget-s 450]
    PYTHONPATH=. python bench/gpu_check.py --cpu-smoke    (tiny shapes, Triton interpreter: checks
                                                           that the script itself runs; CI runs it)

Needs only torch, triton and this checkout (nothing installed, no network); Liger-Kernel and Cut
Cross-Entropy are used when importable and skipped with the reason otherwise. Never changes GPU
settings. Every section runs in try/except: a failure is printed and the next section runs.
Exit status: 0 only if every section ran and every check passed; 1 if a section raised, was not run
(time budget), a correctness case failed, or a fastprerl (or naive) benchmark provider failed or
disagreed with the float64 oracle.

Sections
  1. correctness: token_logprobs(impl="triton") (logp, entropy, lse, d/dh, d/dW of
     sum(a * logp) + sum(b * entropy)) against a float64 oracle (the naive reference on float64
     copies), at each model's real (H, V), fp32 and bf16, a random 40% `rows` subset, N not a
     multiple of the blocks, temperature 1.0 and 0.7, atomic and deterministic backward.
     Bound (as in tests/): |impl - oracle| <= |naive same dtype - oracle| + TOL * max(1, |oracle|).
  2. matmul rate: bf16 (and fp32) torch.mm of a comparable size, TFLOP/s.
  3. benchmark, Qwen3-4B head (N=16384, H=2560, V=151936, bf16), fwd+bwd of sum(w * logp):
     naive (if memory allows), fastprerl triton (atomic and deterministic), fastprerl torch
     (token_logprobs and token_loss), torch F.linear_cross_entropy (chunked) if present, Liger
     (chunked log-probs and fused linear cross-entropy), CCE's Triton path. Median of 5 after
     warm-up; peak = torch.cuda.max_memory_allocated - baseline after the inputs; achieved = 8 N H V
     (logits, recomputed logits, dH, dW) / time / bf16 matmul rate; extra memory / naive bf16 logits
     size. Every provider's full logp (where it gives them) and gradients are checked against the
     float64 oracle at this shape (bench/bench_oracle.py; N*V > 2^31 exercises the int64 offsets).
Outputs: printed, and gpu_check.jsonl + gpu_check.md under --out (default bench/results).
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import time
import traceback
from pathlib import Path

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
T0 = time.monotonic()
BUDGET_S = 450.0
LINES: list = []      # markdown report
RECORDS: list = []    # JSON records
FAILURES: list = []   # what makes the exit status non-zero
_OUT = {"dir": None, "meta": {}, "written": 0}


def flush_outputs():
    """Append the new JSON records and rewrite the markdown report (after every section, so a run
    stopped by the time limit still leaves what it measured)."""
    d = _OUT["dir"]
    if d is None:
        return
    with open(d / "gpu_check.jsonl", "a") as f:
        for r in RECORDS[_OUT["written"]:]:
            f.write(json.dumps({**_OUT["meta"], **r}, default=str) + "\n")
    _OUT["written"] = len(RECORDS)
    (d / "gpu_check.md").write_text("\n".join(LINES) + "\n")


def say(msg: str = ""):
    print(msg, flush=True)
    LINES.append(msg)


def left() -> float:
    return BUDGET_S - (time.monotonic() - T0)


def section(name):
    def deco(fn):
        def run(*a, **k):
            say(f"\n## {name}  (t={time.monotonic() - T0:.0f} s)\n")
            if left() < 20:
                say(f"NOT RUN: time budget spent ({BUDGET_S:.0f} s)")
                FAILURES.append(f"{name}: not run (time budget)")
                return None
            try:
                return fn(*a, **k)
            except Exception as e:  # noqa: BLE001
                say(f"FAILED: {type(e).__name__}: {e}")
                FAILURES.append(f"{name}: {type(e).__name__}: {e}")
                traceback.print_exc()
                RECORDS.append({"section": name, "status": "error", "error": f"{type(e).__name__}: {e}"})
                return None
            finally:
                flush_outputs()
                gc.collect()
                try:
                    import torch
                    if torch.cuda.is_available():
                        torch.cuda.empty_cache()
                except Exception:  # noqa: BLE001
                    pass
        return run
    return deco


# ----------------------------------------------------------------------------------------------
# 1. correctness
# ----------------------------------------------------------------------------------------------
def _run_api(K, impl, h, w, t, rows, a, b, temperature, deterministic=False):
    import torch
    h = h.detach().clone().requires_grad_(True)
    w = w.detach().clone().requires_grad_(True)
    kw = {"deterministic": deterministic} if impl == "triton" else {}
    out = K.token_logprobs(h, w, t, rows=rows, temperature=temperature, with_entropy=True, impl=impl, **kw)
    loss = (a.to(out.logp.dtype) * out.logp).sum() + (b.to(out.logp.dtype) * out.entropy).sum()
    dh, dw = torch.autograd.grad(loss, [h, w])
    return {"logp": out.logp.detach(), "entropy": out.entropy.detach(), "lse": out.lse.detach(),
            "dh": dh, "dw": dw}


@section("1. correctness: impl='triton' vs float64 oracle at real shapes")
def correctness(K, dev, models, n_rows):
    import torch
    from bench_oracle import load_tolerances
    TOL = load_tolerances()
    say("| model | H | V | N | rows | dtype | T | backward | quantity | max err impl | max err naive | bound | ok |")
    say("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    n_fail = n_ok = 0
    plan = []
    for name, (H, V) in models.items():
        for dtype in (torch.bfloat16, torch.float32):
            plan.append((name, H, V, dtype, 1.0, False))
    plan.append(("qwen3-4b", *models.get("qwen3-4b", next(iter(models.values()))), torch.bfloat16, 0.7, True))
    for name, H, V, dtype, temp, det in plan:
        if left() < 60:
            say(f"(stopping correctness early: {left():.0f} s left)")
            FAILURES.append(f"correctness: {len(plan) - n_ok - n_fail} cases not run (time budget)")
            break
        g = torch.Generator().manual_seed(0)
        N = n_rows
        h = torch.randn(N, H, generator=g).to(dev, dtype)
        w = (torch.randn(V, H, generator=g) * (H ** -0.5) * 2.0).to(dev, dtype)
        t = torch.randint(0, V, (N,), generator=g).to(dev)
        rows = torch.randperm(N, generator=g)[: int(0.4 * N)].sort().values.to(dev)
        a = torch.randn(N, generator=g).to(dev)
        b = torch.randn(N, generator=g).to(dev)
        t0 = time.monotonic()
        got = _run_api(K, "triton", h, w, t, rows, a, b, temp, det)
        naive = _run_api(K, "naive", h, w, t, rows, a, b, temp)
        oracle = _run_api(K, "naive", h.double(), w.double(), t, rows, a.double(), b.double(), temp)
        del h, w
        tol = TOL[dtype]
        case_ok = True
        sign_ok = bool((got["logp"] <= 0).all())
        for key, q in (("logp", "logp"), ("entropy", "entropy"), ("lse", "logp"), ("dh", "grad"), ("dw", "grad")):
            gi, ni, oi = got[key].double(), naive[key].double(), oracle[key]
            finite = bool(torch.isfinite(gi).all())
            err = (gi - oi).abs().max().item()
            ref = (ni - oi).abs().max().item()
            scale = max(1.0, oi.abs().max().item())
            bound = ref + tol[q] * scale
            ok = finite and err <= bound and (sign_ok or key != "logp")
            case_ok &= ok
            say(f"| {name} | {H} | {V} | {N} | {rows.numel()} | {str(dtype).split('.')[-1]} | {temp} | "
                f"{'deterministic' if det else 'atomic'} | {key} | {err:.3e} | {ref:.3e} | {bound:.3e} | "
                f"{'ok' if ok else 'FAIL'}{'' if finite else ' (non-finite)'}{'' if sign_ok or key != 'logp' else ' (logp > 0)'} |")
            RECORDS.append({"section": "correctness", "model": name, "H": H, "V": V, "N": N,
                            "rows": rows.numel(), "dtype": str(dtype), "temperature": temp,
                            "deterministic": det, "quantity": key, "err": err, "naive_err": ref,
                            "bound": bound, "ok": ok})
        n_ok += case_ok
        n_fail += not case_ok
        del got, naive, oracle
        gc.collect()
        if dev.type == "cuda":
            torch.cuda.empty_cache()
        print(f"  ({name} {dtype} done in {time.monotonic() - t0:.1f} s)", flush=True)
    say(f"\ncorrectness: {n_ok} cases ok, {n_fail} failed")
    if n_fail:
        FAILURES.append(f"correctness: {n_fail} cases failed")
    return n_fail == 0


# ----------------------------------------------------------------------------------------------
# 2. matmul rate
# ----------------------------------------------------------------------------------------------
def _time_cuda(fn, reps, warmup=1, dev=None):
    import torch
    for _ in range(warmup):
        fn()
    if dev is not None and dev.type == "cuda":
        torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        if dev is not None and dev.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), times


@section("2. matmul rate (torch.mm)")
def matmul_rate(dev, M, K, Nc):
    import torch
    rates = {}
    for dtype in (torch.bfloat16, torch.float32):
        a = torch.randn(M, K, device=dev, dtype=dtype)
        b = torch.randn(K, Nc, device=dev, dtype=dtype)
        c = torch.empty(M, Nc, device=dev, dtype=dtype)
        med, _ = _time_cuda(lambda: torch.mm(a, b, out=c), reps=10, warmup=2, dev=dev)  # noqa: F821 (del below)
        rate = 2.0 * M * K * Nc / med
        rates[str(dtype)] = rate
        say(f"torch.mm {str(dtype).split('.')[-1]} ({M}x{K}) @ ({K}x{Nc}): {med * 1e3:.2f} ms = "
            f"{rate / 1e12:.1f} TFLOP/s" + ("  (fp32: torch's default matmul precision setting)" if dtype == torch.float32 else ""))
        RECORDS.append({"section": "matmul", "dtype": str(dtype), "M": M, "K": K, "N": Nc, "median_s": med,
                        "flops_per_s": rate})
        del a, b, c
    return rates


# ----------------------------------------------------------------------------------------------
# 3. benchmark
# ----------------------------------------------------------------------------------------------
def _providers(K, dev, smoke: bool = False):
    """name -> step factory make(h, W, t, w) -> step() returning logp (or None), or a skip reason string."""
    import torch
    import torch.nn.functional as F

    provs = {}

    def lp_step(f):
        def make(h, W, t, w):
            def step():
                h.grad = W.grad = None
                lp = f(h, W, t)
                (w * lp).sum().backward()
                return lp
            return step
        return make

    provs["naive"] = lp_step(lambda h, W, t: (h @ W.t()).float().log_softmax(-1).gather(-1, t[:, None]).squeeze(-1))
    provs["fastprerl_triton"] = lp_step(lambda h, W, t: K.token_logprobs(h, W, t, impl="triton").logp)
    provs["fastprerl_triton_det"] = lp_step(
        lambda h, W, t: K.token_logprobs(h, W, t, impl="triton", deterministic=True).logp)
    provs["fastprerl_torch_logprobs"] = lp_step(lambda h, W, t: K.token_logprobs(h, W, t, impl="torch").logp)

    def loss_make(h, W, t, w):
        def step():
            h.grad = W.grad = None
            K.token_loss(h, W, t, lambda lp, i: w[i] * lp, impl="torch").backward()
        return step
    provs["fastprerl_torch_loss"] = loss_make

    if hasattr(F, "linear_cross_entropy") and hasattr(torch.nn, "LinearCrossEntropyOptions"):
        opts = torch.nn.LinearCrossEntropyOptions()
        provs["torch_linear_cross_entropy"] = lp_step(
            lambda h, W, t: -F.linear_cross_entropy(h, W, t, reduction="none", options=opts).float())
    else:
        provs["torch_linear_cross_entropy"] = f"torch {torch.__version__} has no chunked F.linear_cross_entropy"
    try:
        from liger_kernel.chunked_loss.fused_linear_ppo import LigerFusedLinearPPOBase
        provs["liger_chunked_logprob"] = lp_step(
            lambda h, W, t: LigerFusedLinearPPOBase.chunk_forward(h.unsqueeze(0), W, t.unsqueeze(0))[0])
    except Exception as e:  # noqa: BLE001
        provs["liger_chunked_logprob"] = f"liger-kernel not importable ({type(e).__name__}: {e})"
    if dev.type != "cuda":
        provs["liger_fused_linear_ce"] = provs["cce"] = "needs CUDA (Triton kernels)"
        return provs
    try:
        from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy
        provs["liger_fused_linear_ce"] = lp_step(
            lambda h, W, t: -liger_fused_linear_cross_entropy(h, W, t, reduction="none").float())
    except Exception as e:  # noqa: BLE001
        provs["liger_fused_linear_ce"] = f"liger-kernel fused linear CE not importable ({type(e).__name__}: {e})"
    try:
        from cut_cross_entropy import linear_cross_entropy as cce
        provs["cce"] = lp_step(lambda h, W, t: -cce(h, W, t, impl="cce", reduction="none").float())
        provs["cce_exact"] = lp_step(
            lambda h, W, t: -cce(h, W, t, impl="cce", reduction="none", filter_eps=None).float())
    except Exception as e:  # noqa: BLE001
        provs["cce"] = f"cut-cross-entropy not importable ({type(e).__name__}: {e})"
    return provs


# providers whose failure (or disagreement with the oracle) fails the check; the peers' is reported only
OWN = ("naive", "fastprerl_triton", "fastprerl_triton_det", "fastprerl_torch_logprobs", "fastprerl_torch_loss")


@section("3. benchmark (fwd+bwd of sum(w * logp)), every provider checked against the float64 oracle")
def benchmark(K, dev, N, H, V, dtype_name, rates, reps, smoke=False):
    """Times every provider and checks its outputs; returns {provider: {median_s, peak_bytes, check_ok}}."""
    import torch
    from bench_oracle import check, failures, logprob_outputs

    dtype = getattr(torch, dtype_name)
    el = torch.tensor([], dtype=dtype).element_size()
    logits_bytes = N * V * el
    flops = 8.0 * N * H * V
    mm_rate = (rates.get(str(dtype)) or rates.get("torch.bfloat16")) if rates else None
    say(f"shape: N={N} H={H} V={V} {dtype_name}; naive logits ({dtype_name}) = {logits_bytes / 2**30:.2f} GiB; "
        f"8NHV = {flops / 1e12:.1f} TFLOP; matmul rate used = "
        + (f"{mm_rate / 1e12:.1f} TFLOP/s" if mm_rate else "unknown"))
    g = torch.Generator().manual_seed(0)
    h = torch.randn(N, H, generator=g).to(dev, dtype).requires_grad_(True)
    W = (torch.randn(V, H, generator=g) * 0.02).to(dev, dtype).requires_grad_(True)
    t = torch.randint(0, V, (N,), generator=g).to(dev)
    w = (torch.rand(N, generator=g) + 0.5).to(dev)
    oracle = logprob_outputs(h, W, t, w)
    naive = logprob_outputs(h, W, t, w, dtype=dtype)
    say("\n| provider | median ms | peak extra GiB | extra / naive logits | achieved (8NHV/t/mm) | x naive | "
        "oracle check | note |")
    say("|---|---|---|---|---|---|---|---|")
    results = {}
    for name, make in _providers(K, dev, smoke).items():
        if isinstance(make, str):
            say(f"| {name} | - | - | - | - | - | - | skipped: {make} |")
            RECORDS.append({"section": "benchmark", "provider": name, "status": "skipped", "reason": make})
            continue
        if left() < 45:
            say(f"| {name} | - | - | - | - | - | - | NOT RUN: time budget |")
            if name in OWN:
                FAILURES.append(f"benchmark {name}: not run (time budget)")
            continue
        if name == "naive" and dev.type == "cuda":
            free, _ = torch.cuda.mem_get_info()
            need = logits_bytes * (1 + 3 * 4 // el) + 2 * V * H * el
            if need > 0.9 * free:
                say(f"| naive | - | - | - | - | - | - | skipped: needs ~{need / 2**30:.0f} GiB, {free / 2**30:.0f} GiB free |")
                continue
        try:
            step = make(h, W, t, w)
            t_c = time.monotonic()
            step()  # warm-up (compilation)
            if dev.type == "cuda":
                torch.cuda.synchronize()
            compile_s = time.monotonic() - t_c
            h.grad = W.grad = None
            gc.collect()
            if dev.type == "cuda":
                torch.cuda.synchronize()
                torch.cuda.empty_cache()
                base = torch.cuda.memory_allocated()
                torch.cuda.reset_peak_memory_stats()
            med, times = _time_cuda(step, reps=reps, warmup=0, dev=dev)
            peak = (torch.cuda.max_memory_allocated() - base) if dev.type == "cuda" else 0
            lp = step()
            got = {"grad_h": h.grad, "grad_w": W.grad}
            if lp is not None:
                got["logp"] = lp.detach()
            verdict = check(got, oracle, naive, dtype)
            bad = failures(verdict)
            if bad and name in OWN:
                FAILURES.append(f"benchmark {name}: " + "; ".join(bad))
            del lp, got
            ach = (flops / med / mm_rate) if mm_rate else None
            results[name] = {"median_s": med, "peak_bytes": peak, "check_ok": verdict["ok"]}
            base_t = results.get("naive", {}).get("median_s")
            cells = [name, f"{med * 1e3:.1f}", f"{peak / 2**30:.2f}", f"{peak / logits_bytes:.2f}",
                     f"{ach:.2f}" if ach else "-", f"{med / base_t:.2f}" if base_t else "-",
                     "ok" if verdict["ok"] else "FAIL: " + "; ".join(bad)[:200], f"warm-up {compile_s:.1f} s"]
            say("| " + " | ".join(cells) + " |")
            RECORDS.append({"section": "benchmark", "provider": name, "N": N, "H": H, "V": V, "dtype": dtype_name,
                            "mode": "fwd+bwd", "median_s": med, "times_s": times, "peak_mb": peak / 2**20,
                            "extra_over_naive_logits": peak / logits_bytes, "achieved_fraction": ach,
                            "warmup_s": compile_s, "status": "ok", "check": verdict})
        except Exception as e:  # noqa: BLE001
            say(f"| {name} | - | - | - | - | - | - | FAILED: {type(e).__name__}: {str(e)[:200]} |")
            RECORDS.append({"section": "benchmark", "provider": name, "status": "error", "error": str(e)[:500]})
            if name in OWN:
                FAILURES.append(f"benchmark {name}: {type(e).__name__}: {e}")
            traceback.print_exc()
        finally:
            h.grad = W.grad = None
            gc.collect()
            if dev.type == "cuda":
                torch.cuda.empty_cache()
    return results


def summary_table(res) -> str:
    """The short table printed last: the targets of the fused kernels at the benchmark shape."""
    mine = res.get("fastprerl_triton") if res else None
    lines = ["| quantity | value | target |", "|---|---|---|"]
    if mine is None:
        return "\n".join(lines + ["| fastprerl_triton | not measured | - |"])
    rec = next((r for r in RECORDS if r.get("provider") == "fastprerl_triton" and r.get("status") == "ok"), {})
    ach = rec.get("achieved_fraction")
    lines.append(f"| achieved / bf16 matmul rate | {ach:.2f} | >= 0.70 |" if ach else "| achieved | - | >= 0.70 |")
    for peer, target in (("liger_fused_linear_ce", 1.2), ("cce", 1.0), ("torch_linear_cross_entropy", None)):
        p = res.get(peer)
        sp = f"{p['median_s'] / mine['median_s']:.2f}x" if p else "not measured"
        lines.append(f"| speed-up vs {peer} | {sp} | {'>= %.1fx' % target if target else '-'} |")
    naive_logits = rec.get("extra_over_naive_logits")
    lines.append(f"| extra memory / naive logits | {naive_logits:.3f} | < 0.05 |" if naive_logits is not None
                 else "| extra memory | - | < 0.05 |")
    lines.append(f"| oracle check (own providers) | {'ok' if not FAILURES else 'FAILED'} | ok |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
def main(argv=None):
    global BUDGET_S
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(BENCH / "results"))
    ap.add_argument("--budget-s", type=float, default=BUDGET_S)
    ap.add_argument("--cpu-smoke", action="store_true", help="tiny shapes on CPU, Triton interpreter")
    args = ap.parse_args(argv)
    BUDGET_S = args.budget_s
    if args.cpu_smoke:
        os.environ["TRITON_INTERPRET"] = "1"   # before triton is imported
    sys.path.insert(0, str(BENCH))
    import harness
    import torch
    K = harness.import_kernels()
    dev = torch.device("cuda" if torch.cuda.is_available() and not args.cpu_smoke else "cpu")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    info = harness.machine_info(dev.type)
    vers = harness.versions()
    sha = harness.git_sha()
    _OUT["dir"] = out
    _OUT["meta"] = {"machine": info, "versions": vers, "git_sha": sha,
                    "timestamp": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    say("# fastprerl GPU check\n")
    say(f"- machine: {info.get('gpu', 'no GPU')}; {info['cpu']}; {info['cores']} cores; {info['platform']}")
    say("- versions: " + ", ".join(f"{k} {v}" for k, v in vers.items() if v) + f"; git {sha}")
    if dev.type != "cuda" and not args.cpu_smoke:
        say("\nno CUDA device: nothing was checked (use --cpu-smoke to exercise the script)")
        return 2
    if args.cpu_smoke:
        models = {"tiny-a": (64, 1000), "qwen3-4b": (96, 1500)}
        n_rows, mm, bench_shape, reps = 45, (256, 256, 256), (64, 96, 1500), 2
    else:
        import shapes as S
        models = dict(S.MODEL_SHAPES)
        n_rows, mm, bench_shape, reps = 515, (16384, 2560, 16384), (16384, 2560, 151936), 5
    correctness(K, dev, models, n_rows)
    rates = matmul_rate(dev, *mm) or {}
    res = benchmark(K, dev, *bench_shape, "bfloat16" if dev.type == "cuda" else "float32", rates, reps,
                    smoke=args.cpu_smoke)
    say(f"\ntotal {time.monotonic() - T0:.0f} s")
    say("\n## summary\n")
    say(summary_table(res))
    say("\n" + ("FAILED:\n" + "\n".join(f"- {f}" for f in FAILURES) if FAILURES else "all checks passed"))
    RECORDS.append({"section": "summary", "failures": FAILURES})
    flush_outputs()
    print(f"wrote {out / 'gpu_check.jsonl'} and {out / 'gpu_check.md'}")
    return 1 if FAILURES else 0


if __name__ == "__main__":
    sys.exit(main())
