"""Fused Triton log-prob kernels against the float64 oracle.

Without CUDA the kernels run under the Triton interpreter (TRITON_INTERPRET=1), so shapes stay tiny.
Triton reads TRITON_INTERPRET when `triton.language` is first imported (it decorates its own
standard library then), so the flag has to be in the environment before anything imports triton:
  - if nothing has imported triton yet, this module sets the flag, imports, and restores the
    environment (the autouse fixture sets it again while these tests run);
  - if another module imported triton without the flag first, these tests cannot interpret in this
    process: they are skipped here and `test_in_subprocess` runs this file in a fresh interpreter
    with TRITON_INTERPRET=1.

Error bound (design notes, tests/tolerances.py): max|impl - oracle| <= max|naive same dtype - oracle|
+ TOL[dtype][quantity] * max(1, max|oracle|), the oracle = `naive_token_logprobs` on float64 copies
(lse is held to the logp tolerance).
"""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

INTERPRET = not torch.cuda.is_available()
DEVICE = torch.device("cpu" if INTERPRET else "cuda")

_prev_flag = os.environ.get("TRITON_INTERPRET")
if INTERPRET and "triton" not in sys.modules:
    os.environ["TRITON_INTERPRET"] = "1"
try:
    triton = pytest.importorskip("triton")
    from fastprerl.kernels import token_logprobs, token_loss, triton_runtime
    from fastprerl.kernels import triton_logprob as tlp
    from fastprerl.kernels.reference import naive_token_logprobs

    from tolerances import TOL, max_err
finally:
    if _prev_flag is None:
        os.environ.pop("TRITON_INTERPRET", None)
    else:
        os.environ["TRITON_INTERPRET"] = _prev_flag

# can the kernels run in this process? (GPU: always; CPU: only if triton was imported interpreted)
IN_PROCESS = (not INTERPRET) or tlp.triton_interpreted_at_import()
in_process = pytest.mark.skipif(not IN_PROCESS, reason="triton was imported without TRITON_INTERPRET=1 "
                                "before this module; run by test_in_subprocess instead")


@pytest.fixture(autouse=True)
def _triton_mode(monkeypatch):
    if INTERPRET and IN_PROCESS:
        monkeypatch.setenv("TRITON_INTERPRET", "1")


@pytest.mark.skipif(IN_PROCESS, reason="the tests of this file run in this process")
def test_in_subprocess():
    env = dict(os.environ, TRITON_INTERPRET="1")
    res = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__],
                         capture_output=True, text=True, env=env, timeout=600)
    assert res.returncode == 0, res.stdout[-6000:] + res.stderr[-3000:]


# small blocks so that tiny shapes still cover several row blocks, vocabulary tiles (the last one
# partial), K slices (the last one partial), vocabulary splits and the grouped backward ordering
MULTI_TILE = tlp.KernelConfig(block_m=16, block_n=32, block_k=16, group_m=2, vocab_splits=3)


def _inputs(M, H, V, dtype, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(M, H, generator=g) * scale
    w = torch.randn(V, H, generator=g) * (H ** -0.5) * 2.0
    t = torch.randint(0, V, (M,), generator=g)
    up = torch.randn(3, M, generator=g)              # upstream weights for logp, entropy, lse
    return h.to(DEVICE, dtype), w.to(DEVICE, dtype), t.to(DEVICE), up.to(DEVICE)


def _run(fn, h, w, t, up, temperature, with_entropy):
    """Outputs and d/d(h, w) of sum(up0 * logp + up1 * entropy + up2 * lse)."""
    h = h.detach().clone().requires_grad_(True)
    w = w.detach().clone().requires_grad_(True)
    logp, ent, lse = fn(h, w, t, temperature, with_entropy)
    up = up.to(logp.dtype)
    loss = (up[0] * logp).sum() + (up[2] * lse).sum()
    if with_entropy:
        loss = loss + (up[1] * ent).sum()
    dh, dw = torch.autograd.grad(loss, [h, w])
    return {"logp": logp.detach(), "entropy": ent.detach() if with_entropy else None,
            "lse": lse.detach(), "dh": dh, "dw": dw}


def _naive(h, w, t, temperature, with_entropy):
    return naive_token_logprobs(h, w, t, temperature, with_entropy)


def _check_bound(name, impl, naive, oracle, tol):
    err, ref = max_err(impl, oracle), max_err(naive, oracle)
    scale = max(1.0, oracle.abs().max().item())
    assert err <= ref + tol * scale, (f"{name}: |impl - oracle| = {err:.3e} > |naive - oracle| = {ref:.3e} "
                                      f"+ {tol:g} * {scale:.3e}")


def _compare(M, H, V, dtype, temperature, with_entropy, deterministic, config=None, scale=1.0, seed=0):
    h, w, t, up = _inputs(M, H, V, dtype, seed=seed, scale=scale)

    def impl(hh, ww, tt, temp, ent):
        return tlp.triton_token_logprobs(hh, ww, tt, temp, ent, deterministic, config=config)

    got = _run(impl, h, w, t, up, temperature, with_entropy)
    naive = _run(_naive, h, w, t, up, temperature, with_entropy)
    oracle = _run(_naive, h.double(), w.double(), t, up.double(), temperature, with_entropy)

    assert got["logp"].dtype == torch.float32 and got["lse"].dtype == torch.float32
    assert got["dh"].dtype == dtype and got["dw"].dtype == dtype
    assert got["logp"].shape == (M,) and got["dh"].shape == (M, H) and got["dw"].shape == (V, H)
    assert bool((got["logp"] <= 0).all()), "log-probs must be <= 0"
    tol = TOL[dtype]
    for key, q in (("logp", "logp"), ("entropy", "entropy"), ("lse", "logp"), ("dh", "grad"),
                   ("dw", "grad")):
        if key == "entropy" and not with_entropy:
            assert got[key] is None
            continue
        assert torch.isfinite(got[key]).all(), key
        _check_bound(key, got[key], naive[key], oracle[key], tol[q])
    return got


# ------------------------------------------------------------------------------------------------
@in_process
@pytest.mark.parametrize("M,H,V", [(1, 16, 50), (37, 61, 100)], ids=["N1", "odd"])
@pytest.mark.parametrize("deterministic", [False, True], ids=["atomic", "det"])
@pytest.mark.parametrize("with_entropy", [False, True], ids=["lp", "ent"])
@pytest.mark.parametrize("temperature", [0.7, 1.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_matches_oracle(dtype, temperature, with_entropy, deterministic, M, H, V):
    _compare(M, H, V, dtype, temperature, with_entropy, deterministic)


@pytest.mark.parametrize("deterministic", [False, True], ids=["atomic", "det"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@in_process
def test_multi_tile_blocks(dtype, deterministic):
    """Several row blocks / vocab tiles / K slices / splits, all with partial edges (37, 100, 61)."""
    _compare(37, 61, 100, dtype, 0.7, True, deterministic, config=MULTI_TILE)


@in_process
def test_large_vocab_default_blocks():
    _compare(37, 61, 1000, torch.float32, 0.7, True, False)


@in_process
def test_fp16():
    _compare(5, 32, 100, torch.float16, 1.0, True, False)


@in_process
def test_large_logits_are_stable():
    """Logits of several hundred (lse far from 0): online logsumexp and entropy stay finite."""
    got = _compare(5, 16, 100, torch.float32, 0.7, True, False, config=MULTI_TILE, scale=60.0)
    assert got["lse"].abs().max() > 100


@in_process
def test_deterministic_is_bitwise_reproducible():
    h, w, t, up = _inputs(37, 61, 100, torch.float32, seed=3)

    def impl(hh, ww, tt, temp, ent):
        return tlp.triton_token_logprobs(hh, ww, tt, temp, ent, True, config=MULTI_TILE)

    a = _run(impl, h, w, t, up, 0.7, True)
    b = _run(impl, h, w, t, up, 0.7, True)
    for key in a:
        assert torch.equal(a[key], b[key]), key


@in_process
def test_zero_rows_launch_nothing(monkeypatch):
    def no_launch(fn):
        raise AssertionError("no kernel may be launched for M == 0")

    monkeypatch.setattr(triton_runtime, "kernel", no_launch)
    for dtype in (torch.float32, torch.bfloat16):
        h = torch.zeros(0, 16, device=DEVICE, dtype=dtype, requires_grad=True)
        w = torch.randn(50, 16, device=DEVICE).to(dtype).requires_grad_(True)
        t = torch.zeros(0, dtype=torch.long, device=DEVICE)
        for deterministic in (False, True):
            logp, ent, lse = tlp.triton_token_logprobs(h, w, t, 0.7, True, deterministic)
            assert logp.shape == ent.shape == lse.shape == (0,)
            assert logp.dtype == ent.dtype == lse.dtype == torch.float32
            dh, dw = torch.autograd.grad(logp.sum() + ent.sum() + lse.sum(), [h, w])
            assert dh.shape == (0, 16) and dh.dtype == dtype
            assert dw.shape == (50, 16) and dw.dtype == dtype and not dw.any()


@in_process
def test_partial_upstream_gradients_and_frozen_inputs():
    """Only entropy used (no logp/lse gradient); only logp used; weight or h without grad."""
    h, w, t, _ = _inputs(9, 24, 70, torch.float32, seed=5)
    for use in ("entropy", "logp"):
        for need in ((True, True), (True, False), (False, True)):
            grads = []
            for fn in ("triton", "oracle"):
                hh = (h.double() if fn == "oracle" else h).clone().requires_grad_(need[0])
                ww = (w.double() if fn == "oracle" else w).clone().requires_grad_(need[1])
                if fn == "triton":
                    logp, ent, lse = tlp.triton_token_logprobs(hh, ww, t, 0.8, True, False)
                else:
                    logp, ent, lse = naive_token_logprobs(hh, ww, t, 0.8, True)
                loss = ent.sum() if use == "entropy" else logp.sum()
                inputs = [x for x, n in zip((hh, ww), need) if n]
                grads.append(torch.autograd.grad(loss, inputs))
            for g, o in zip(*grads):
                torch.testing.assert_close(g.double(), o, rtol=1e-4, atol=1e-5)


@in_process
def test_non_contiguous_inputs():
    """Strides are passed, not assumed: a row-strided h and a transposed-storage weight."""
    h, w, t, up = _inputs(11, 32, 90, torch.float32, seed=7)
    h_big = torch.zeros(22, 40, device=DEVICE)
    h_big[::2, 3:35] = h
    h_view = h_big[::2, 3:35]
    w_view = w.t().contiguous().t()
    assert not h_view.is_contiguous() and not w_view.is_contiguous()
    for deterministic in (False, True):
        got = tlp.triton_token_logprobs(h_view, w_view, t, 0.9, True, deterministic)
        ref = tlp.triton_token_logprobs(h, w, t, 0.9, True, deterministic)
        for a, b in zip(got, ref):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    oracle = naive_token_logprobs(h.double(), w.double(), t, 0.9, True)
    for a, b in zip(got, oracle):
        torch.testing.assert_close(a.double(), b, rtol=1e-5, atol=1e-5)


@in_process
def test_public_api_with_rows():
    n, H, V = 12, 20, 60
    h, w, t, up = _inputs(n, H, V, torch.float32, seed=11)
    rows = torch.tensor([0, 3, 4, 10], device=DEVICE)
    results = {}
    for impl, dt in (("triton", torch.float32), ("naive", torch.float64)):
        hh = h.to(dt).requires_grad_(True)
        ww = w.to(dt).requires_grad_(True)
        out = token_logprobs(hh, ww, t, rows=rows, temperature=0.7, with_entropy=True, impl=impl)
        loss = (up[0].to(dt) * out.logp).sum() + (up[1].to(dt) * out.entropy).sum()
        dh, dw = torch.autograd.grad(loss, [hh, ww])
        results[impl] = (out.logp, out.entropy, out.lse, dh, dw)
    inactive = torch.ones(n, dtype=torch.bool, device=DEVICE)
    inactive[rows] = False
    logp, ent, lse, dh, dw = results["triton"]
    assert logp.dtype == torch.float32 and logp.shape == (n,)
    assert not logp[inactive].any() and not ent[inactive].any() and not dh[inactive].any()
    for a, b in zip(results["triton"], results["naive"]):
        torch.testing.assert_close(a.double(), b, rtol=1e-5, atol=1e-5)

    # no active rows at all
    hh = h.clone().requires_grad_(True)
    ww = w.clone().requires_grad_(True)
    out = token_logprobs(hh, ww, t, rows=torch.empty(0, dtype=torch.long, device=DEVICE),
                         with_entropy=True, impl="triton")
    assert out.logp.shape == (n,) and not out.logp.any() and not out.entropy.any()
    dh, dw = torch.autograd.grad(out.logp.sum() + out.entropy.sum(), [hh, ww])
    assert not dh.any() and not dw.any()


@in_process
def test_public_token_loss():
    n, H, V = 10, 16, 40
    h, w, t, up = _inputs(n, H, V, torch.float32, seed=13)
    rows = torch.tensor([1, 2, 7], device=DEVICE)
    adv = up[0]
    grads = []
    for impl, dt in (("triton", torch.float32), ("naive", torch.float64)):
        hh = h.to(dt).requires_grad_(True)
        ww = w.to(dt).requires_grad_(True)
        ent = torch.empty(n, dtype=dt, device=DEVICE)
        loss = token_loss(hh, ww, t, lambda lp, idx: -lp * adv[idx].to(lp.dtype), rows=rows,
                          temperature=0.7, impl=impl, entropy_out=ent)
        grads.append((loss.detach(), *torch.autograd.grad(loss, [hh, ww]), ent))
    assert grads[0][-1][rows].min() > 0 and not grads[0][-1][[0, 3, 9]].any()
    for a, b in zip(*grads):
        torch.testing.assert_close(a.double(), b.double(), rtol=1e-5, atol=1e-5)


@in_process
def test_input_validation(monkeypatch):
    h, w, t, _ = _inputs(4, 16, 30, torch.float32)
    with pytest.raises(ValueError, match="dtype"):
        tlp.triton_token_logprobs(h, w.double(), t)
    with pytest.raises(ValueError, match=r"\(V, H=16\)"):
        tlp.triton_token_logprobs(h, w[:, :8], t)
    with pytest.raises(ValueError, match="t must be"):
        tlp.triton_token_logprobs(h, w, t[:3])
    with pytest.raises(ValueError, match="temperature"):
        tlp.triton_token_logprobs(h, w, t, 0.0)
    with pytest.raises(ValueError, match="block_k"):
        tlp.KernelConfig(block_m=16, block_n=32, block_k=8)
    if INTERPRET:
        bad = t.clone()
        bad[0] = 30
        with pytest.raises(ValueError, match=r"\[0, 30\)"):   # checked by the public entry for every impl
            token_logprobs(h, w, bad, impl="triton")
        monkeypatch.delenv("TRITON_INTERPRET")
        with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
            tlp.triton_token_logprobs(h, w, t)


@pytest.mark.skipif(not INTERPRET, reason="interpreter-only: import order of the interpreter flag")
def test_flag_set_after_triton_import_fails_clearly():
    """Setting TRITON_INTERPRET=1 after triton was imported cannot work (Triton fixes its standard
    library at import): the launcher must say so instead of failing deep inside the interpreter."""
    code = textwrap.dedent("""
        import os
        os.environ.pop("TRITON_INTERPRET", None)
        import torch
        from fastprerl.kernels import triton_logprob as tlp
        os.environ["TRITON_INTERPRET"] = "1"
        try:
            tlp.triton_token_logprobs(torch.randn(3, 16), torch.randn(20, 16), torch.tensor([1, 2, 3]))
        except RuntimeError as e:
            assert "before anything imports triton" in str(e), e
            print("ok")
    """)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         timeout=120)
    assert res.returncode == 0 and "ok" in res.stdout, res.stdout[-2000:] + res.stderr[-3000:]


# ------------------------------------------------------------------------------------------------ frozen head
def _frozen_reference(h, w, t, rows, temperature, loss_fn):
    """(loss, d loss / d h, entropy) of sum_{rows} loss_fn(logp) with the weight frozen, by autograd through the
    naive reference in h's dtype (float64 inputs: the oracle); entropy is 0 on inactive rows."""
    hh = h.detach().clone().requires_grad_(True)
    lp, ent, _ = naive_token_logprobs(hh, w.detach(), t, temperature, with_entropy=True)
    idx = rows if rows is not None else torch.arange(h.shape[0], device=h.device)
    loss = loss_fn(lp.double()[idx], idx).sum()
    (dh,) = torch.autograd.grad(loss, [hh])
    mask = torch.zeros(h.shape[0], dtype=torch.bool, device=h.device)
    mask[idx] = True
    return loss.detach(), dh, (ent * mask).detach()


@in_process
@pytest.mark.parametrize("rows_kind", ["all", "compacted"])
@pytest.mark.parametrize("with_entropy", [False, True], ids=["lp", "ent"])
@pytest.mark.parametrize("temperature", [0.7, 1.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_frozen_head_token_loss_matches_oracle(dtype, temperature, with_entropy, rows_kind):
    """token_loss(impl="triton") with weight.requires_grad False: one sweep (E_p[W] accumulated in the forward
    kernel), loss, d loss / d h and entropy within the naive error of the float64 oracle; weight.grad None.
    The loss is nonlinear in logp, so g = f'(logp) needs the final logp."""
    M, H, V = 37, 61, 300
    h, w, t, up = _inputs(M, H, V, dtype, seed=21)
    rows = (torch.nonzero(up[1] > -0.3).view(-1) if rows_kind == "compacted" else None)
    adv = up[0]
    loss_fn = lambda lp, idx: -adv[idx].to(lp.dtype) * torch.exp(lp) + 0.1 * lp ** 2  # noqa: E731
    hh = h.clone().requires_grad_(True)
    ent = torch.full((M,), float("nan"), device=DEVICE) if with_entropy else None
    loss = token_loss(hh, w, t, loss_fn, rows=rows, temperature=temperature, impl="triton", entropy_out=ent)
    loss.backward()
    assert w.grad is None and hh.grad.dtype == dtype
    lo, gho, eo = _frozen_reference(h.double(), w.double(), t, rows, temperature, loss_fn)
    ln, ghn, en = _frozen_reference(h, w, t, rows, temperature, loss_fn)
    tol = TOL[dtype]
    assert abs(loss.item() - lo.item()) <= abs(ln.item() - lo.item()) + tol["logp"] * M
    _check_bound("dh", hh.grad, ghn, gho, tol["grad"])
    if rows is not None:
        assert 0 < rows.numel() < M and not hh.grad[torch.isin(torch.arange(M, device=DEVICE), rows,
                                                                invert=True)].any()
    if with_entropy:
        _check_bound("entropy", ent, en, eo, tol["entropy"])


@in_process
@pytest.mark.parametrize("scale", [1.0, 60.0], ids=["plain", "large_logits"])
def test_frozen_forward_multi_tile_matches_oracle(scale):
    """The HAS_EXPECT forward over several row blocks, vocabulary tiles and splits (all with partial edges):
    E_p[W] (rescaled whenever the running max moves, merged across splits), logp and entropy against float64."""
    M, H, V = 37, 61, 100
    h, w, t, _ = _inputs(M, H, V, torch.float32, seed=22, scale=scale)
    logp, ent, expect = tlp.triton_frozen_forward(h, w, t, 0.7, True, config=MULTI_TILE)
    z = (h.double() @ w.double().t()) / 0.7
    p = torch.softmax(z, dim=-1)
    lp_o, ent_o, _ = naive_token_logprobs(h.double(), w.double(), t, 0.7, with_entropy=True)
    lp_n, ent_n, _ = naive_token_logprobs(h, w, t, 0.7, with_entropy=True)
    ew_n = torch.softmax((h @ w.t()) / 0.7, dim=-1) @ w
    assert expect.shape == (M, H) and expect.dtype == torch.float32
    _check_bound("E_p[W]", expect, ew_n, p @ w.double(), TOL[torch.float32]["grad"])
    _check_bound("logp", logp, lp_n, lp_o, TOL[torch.float32]["logp"])
    _check_bound("entropy", ent, ent_n, ent_o, TOL[torch.float32]["entropy"])


@in_process
def test_frozen_head_is_one_launch_and_no_backward(monkeypatch):
    """The frozen head runs one forward launch (with HAS_EXPECT) and no backward kernel at all."""
    M, H, V = 20, 16, 70
    h, w, t, up = _inputs(M, H, V, torch.float32, seed=23)
    launches = []
    real = tlp.forward_launch

    def counted(*a, **k):
        launch = real(*a, **k)
        launches.append(launch.constexprs["HAS_EXPECT"])
        return launch

    def no_backward(*a, **k):
        raise AssertionError("the frozen head must not run a backward kernel")
    monkeypatch.setattr(tlp, "forward_launch", counted)
    for name in ("triton_backward", "backward_launch", "backward_dh_launch", "backward_dw_launch"):
        monkeypatch.setattr(tlp, name, no_backward)
    hh = h.clone().requires_grad_(True)
    token_loss(hh, w, t, lambda lp, idx: -up[0][idx] * lp, impl="triton").backward()
    assert launches == [True] and w.grad is None and torch.isfinite(hh.grad).all() and hh.grad.abs().sum() > 0
    # a trainable head, for contrast, goes through the backward (which raises here)
    with pytest.raises(AssertionError, match="must not run a backward"):
        token_loss(hh, w.clone().requires_grad_(True), t, lambda lp, idx: -lp, impl="triton").backward()
