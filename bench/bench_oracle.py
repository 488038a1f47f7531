"""The float64 oracle of the per-token log-prob benchmarks and the check of a provider's full outputs against it.

Quantities of one call: logp (N,) = log softmax(h W^T)[t] per row, loss = sum_i w_i logp_i over the active
rows (all rows, or `rows`), and its gradients grad_h (N, H), grad_w (V, H). `logprob_outputs` computes them
with the naive reference (kernels/reference.py) row chunk by row chunk, so that the (N, V) logits never
exist at once: in float64 for the oracle, in the inputs' dtype for the yardstick (the naive computation's
own error).

Bound, the one of tests/tolerances.py (its table is loaded from there, not copied):
    max |impl - oracle| <= max |naive same dtype - oracle| + TOL[dtype][quantity] * max(1, max |oracle|)
"""
from __future__ import annotations

import hashlib
import importlib.util
import os
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CACHE_ENV = "FASTPRERL_ORACLE_CACHE"    # a folder shared by the benchmark workers of one run


def quantity(key: str) -> str:
    """The TOL column of an output: gradients ("grad*") -> "grad", entropy -> "entropy", else "logp"."""
    return "grad" if key.startswith("grad") else ("entropy" if key == "entropy" else "logp")


def cached(key: str, compute: Callable[[], tuple]) -> tuple:
    """compute(), stored under $FASTPRERL_ORACLE_CACHE by `key` so that the workers of one benchmark run
    compute each oracle once (without that variable: computed every time)."""
    import torch

    folder = os.environ.get(CACHE_ENV)
    if not folder:
        return compute()
    path = Path(folder) / (hashlib.sha256(key.encode()).hexdigest()[:24] + ".pt")
    if path.exists():
        return torch.load(path)
    value = compute()
    tmp = path.with_suffix(".tmp")
    torch.save(value, tmp)
    os.replace(tmp, path)
    return value


def load_tolerances() -> dict:
    """TOL of tests/tolerances.py, the one tolerance table of the test suite."""
    spec = importlib.util.spec_from_file_location("_fastprerl_tolerances", REPO / "tests" / "tolerances.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.TOL


def logprob_outputs(hidden, weight, targets, w, rows=None, dtype=None, with_grad: bool = True,
                    chunk_rows: int = 1024) -> dict[str, object]:
    """logp, loss (and grad_h, grad_w) of loss = sum_{i in rows} w_i logp_i, computed in `dtype` (default
    float64) chunk by chunk. logp is 0 outside `rows`. Gradients accumulate in float64 (oracle) / float32."""
    import torch

    from fastprerl.kernels.reference import naive_token_logprobs

    dtype = dtype or torch.float64
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    dev = hidden.device
    n = hidden.shape[0]
    sel = torch.zeros(n, dtype=torch.bool, device=dev)
    sel[rows if rows is not None else slice(None)] = True
    W = weight.detach().to(dtype).requires_grad_(with_grad)
    logp = torch.zeros(n, dtype=acc, device=dev)
    grad_h = torch.zeros(hidden.shape, dtype=acc, device=dev) if with_grad else None
    grad_w = torch.zeros(weight.shape, dtype=acc, device=dev) if with_grad else None
    loss = torch.zeros((), dtype=acc, device=dev)
    for s in range(0, n, chunk_rows):
        e = min(n, s + chunk_rows)
        h = hidden.detach()[s:e].to(dtype).requires_grad_(with_grad)
        with torch.set_grad_enabled(with_grad):
            lp = naive_token_logprobs(h, W, targets[s:e])[0].to(acc)
            lp = torch.where(sel[s:e], lp, torch.zeros_like(lp))
            part = (w[s:e].to(acc) * lp).sum()
        if with_grad:
            gh, gw = torch.autograd.grad(part, [h, W])
            grad_h[s:e] = gh.to(acc)
            grad_w += gw.to(acc)
        logp[s:e] = lp.detach()
        loss += part.detach()
    out = {"logp": logp, "loss": loss}
    if with_grad:
        out.update(grad_h=grad_h, grad_w=grad_w)
    return out


def check(got: dict, oracle: dict, naive: dict, dtype, tol: dict | None = None) -> dict:
    """Per quantity of `got`: {"err", "naive_err", "bound", "ok"}; plus "ok" (all of them, and finite)."""
    import torch

    tol = (tol or load_tolerances())[dtype]
    res = {"ok": True}
    for key, g in got.items():
        if key not in oracle:
            raise KeyError(f"no oracle for output {key!r}; expected some of {sorted(oracle)}")
        o, nv = oracle[key].double(), naive[key].double()
        g = g.detach().double().reshape(o.shape)
        finite = bool(torch.isfinite(g).all())
        err = (g - o).abs().max().item() if o.numel() else 0.0
        ref = (nv - o).abs().max().item() if o.numel() else 0.0
        bound = ref + tol[quantity(key)] * max(1.0, o.abs().max().item() if o.numel() else 0.0)
        ok = finite and err <= bound
        res[key] = {"err": err, "naive_err": ref, "bound": bound, "ok": ok}
        res["ok"] = res["ok"] and ok
    return res


def failures(result: dict) -> list:
    """Human-readable lines for the quantities of a `check` result that failed."""
    return [f"{k}: |impl - oracle| = {v['err']:.3e} > bound {v['bound']:.3e} (naive {v['naive_err']:.3e})"
            for k, v in result.items() if k != "ok" and not v["ok"]]
