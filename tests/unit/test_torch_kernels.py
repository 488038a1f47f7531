"""fastprerl.kernels torch path against the float64 oracle (error bound relative to naive's own error)."""
import pytest
import torch

from fastprerl.kernels import (
    naive_token_logprobs,
    token_logprobs,
    token_logprobs_no_grad,
    token_loss,
)

from tolerances import TOL, max_err

SHAPES = [(1, 16, 50), (37, 61, 1000), (64, 32, 257)]
ROWS = ["all", "none", "random", "negatives"]


def make(n, h, v, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    hid = torch.randn(n, h, generator=g, dtype=torch.float64)
    w = torch.randn(v, h, generator=g, dtype=torch.float64) * (2.0 / h ** 0.5)
    t = torch.randint(0, v, (n,), generator=g)
    return hid.to(dtype), w.to(dtype), t


def row_index(pattern, n, seed=0):
    g = torch.Generator().manual_seed(seed + 1)
    if pattern == "all":
        return None
    if pattern == "none":
        return torch.zeros(0, dtype=torch.long)
    if pattern == "random":
        return torch.nonzero(torch.rand(n, generator=g) < 0.4).view(-1)
    # "negatives": a contiguous-blocks pattern like the rows of negative samples in a packed batch
    mask = torch.zeros(n, dtype=torch.bool)
    mask[: max(1, n // 3)] = True
    mask[n // 2: n // 2 + n // 5] = True
    return torch.nonzero(mask).view(-1)


@pytest.fixture(params=["default", "small_tiles"])
def tiling(request, monkeypatch):
    """"small_tiles" forces many row blocks and vocabulary tiles (and uneven last tiles) at test shapes,
    so the online max / sum-exp / entropy updates across tiles and the equal row blocks are exercised."""
    if request.param == "small_tiles":
        import fastprerl.kernels.torch_logprob as tl
        monkeypatch.setattr(tl, "_ROW_BLOCK", 8)
        monkeypatch.setattr(tl, "_TILE_ELEMS", 8 * 48)
        monkeypatch.setattr(tl, "_MIN_VOCAB_TILE", 5)
    return request.param


def oracle_and_naive(hid, w, t, rows, T, gl, ge):
    """Values and grads of the float64 oracle and of the naive computation in the input dtype."""
    out = {}
    for name, (h_, w_) in {"oracle": (hid.double(), w.double()), "naive": (hid, w)}.items():
        h_ = h_.detach().clone().requires_grad_()
        w_ = w_.detach().clone().requires_grad_()
        lp, ent, lse = naive_token_logprobs(h_, w_, t, T, with_entropy=True)
        mask = torch.zeros(hid.shape[0], dtype=torch.bool)
        mask[rows if rows is not None else slice(None)] = True
        lp, ent = lp * mask, ent * mask
        (lp.double() * gl + ent.double() * ge).sum().backward()
        out[name] = (lp.detach(), ent.detach(), h_.grad, w_.grad)
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("rows_pattern", ROWS)
@pytest.mark.parametrize("T", [1.0, 0.7])
@pytest.mark.parametrize("with_entropy", [True, False])
def test_torch_path_within_naive_error(dtype, shape, rows_pattern, T, with_entropy, tiling):
    """Without entropy the backward takes the bias-folded gradient tiles (mixed-sign upstream grads)."""
    n, h, v = shape
    hid, w, t = make(n, h, v, dtype)
    rows = row_index(rows_pattern, n)
    g = torch.Generator().manual_seed(7)
    gl = torch.randn(n, generator=g, dtype=torch.float64)
    ge = torch.randn(n, generator=g, dtype=torch.float64) if with_entropy else torch.zeros(n, dtype=torch.float64)
    ref = oracle_and_naive(hid, w, t, rows, T, gl, ge)

    h_ = hid.clone().requires_grad_()
    w_ = w.clone().requires_grad_()
    r = token_logprobs(h_, w_, t, rows=rows, temperature=T, with_entropy=with_entropy, impl="torch",)
    assert r.logp.dtype == torch.float32 and r.logp.shape == (n,)
    if with_entropy:
        (r.logp.double() * gl + r.entropy.double() * ge).sum().backward()
    else:
        assert r.entropy is None
        (r.logp.double() * gl).sum().backward()
    got = (r.logp, r.entropy, h_.grad, w_.grad)
    tol = TOL[dtype]
    for k, q in enumerate(["logp", "entropy", "grad", "grad"]):
        if got[k] is None:
            continue
        o, nv, gt = ref["oracle"][k], ref["naive"][k], got[k]
        assert gt.shape == o.shape
        assert max_err(gt, o) <= max_err(nv, o) + tol[q] * max(1.0, o.abs().max().item()), (q, k)
    if rows is not None:
        inactive = torch.ones(n, dtype=torch.bool)
        inactive[rows] = False
        assert torch.all(r.logp[inactive] == 0)
        assert r.entropy is None or torch.all(r.entropy[inactive] == 0)
    assert torch.all(r.logp <= 0)  # a sign bug (positive log-probs) must never pass


def test_gradcheck_float64_torch_path(tiling):
    hid, w, t = make(5, 7, 23, torch.float64)
    rows = torch.tensor([0, 2, 3])

    def f(h_, w_):
        r = token_logprobs(h_, w_, t, rows=rows, temperature=0.7, with_entropy=True, impl="torch")
        return r.logp, r.entropy

    assert torch.autograd.gradcheck(f, (hid.requires_grad_(), w.requires_grad_()))


def test_token_loss_directional_derivatives_float64(tiling):
    # token_loss hands its gradients over once (see the next test), so torch's gradcheck, which runs
    # backward twice, does not apply; check central differences along random directions instead.
    hid, w, t = make(6, 5, 19, torch.float64)
    adv = torch.tensor([1.0, -2.0, 0.5, 0.0, 3.0, -1.0], dtype=torch.float64)

    def f(h_, w_):  # a nonlinearity in loss_fn exercises the chain rule through it
        return token_loss(h_, w_, t, lambda lp, i: -adv[i] * torch.exp(lp) + 0.1 * lp ** 2,
                          temperature=0.7, impl="torch", chunk_rows=4)

    h_, w_ = hid.clone().requires_grad_(), w.clone().requires_grad_()
    f(h_, w_).backward()
    g = torch.Generator().manual_seed(9)
    for _ in range(4):
        dh, dw = torch.randn(hid.shape, generator=g, dtype=torch.float64), torch.randn(w.shape, generator=g,
                                                                                         dtype=torch.float64)
        eps = 1e-6
        num = (f(hid + eps * dh, w + eps * dw) - f(hid - eps * dh, w - eps * dw)).item() / (2 * eps)
        ana = (h_.grad * dh).sum().item() + (w_.grad * dw).sum().item()
        assert abs(num - ana) <= 1e-7 * max(1.0, abs(ana))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows_pattern", ROWS)
@pytest.mark.parametrize("sign", ["mixed", "positive", "negative"])
def test_token_loss_matches_oracle(dtype, rows_pattern, sign, tiling):
    """All three sign cases of d loss / d logp: the torch path forms dW differently for a uniform sign."""
    n, h, v = 37, 61, 1000
    hid, w, t = make(n, h, v, dtype, seed=3)
    rows = row_index(rows_pattern, n)
    adv = torch.randn(n, generator=torch.Generator().manual_seed(5))
    adv = {"mixed": adv, "positive": adv.abs(), "negative": -adv.abs()}[sign]
    loss_fn = lambda lp, idx: -adv[idx] * lp  # noqa: E731
    h_, w_ = hid.clone().requires_grad_(), w.clone().requires_grad_()
    loss = token_loss(h_, w_, t, loss_fn, rows=rows, temperature=0.7, impl="torch", chunk_rows=16)
    loss.backward()
    ref = oracle_and_naive(hid, w, t, rows, 0.7, -adv.double(), torch.zeros(n, dtype=torch.float64))
    lp_o = ref["oracle"][0]
    want = (-adv.double() * lp_o).sum()
    naive_loss = (-adv.double() * ref["naive"][0].double()).sum()
    tol = TOL[dtype]
    assert abs(loss.item() - want.item()) <= abs(naive_loss.item() - want.item()) + tol["logp"] * n
    for got, k in ((h_.grad, 2), (w_.grad, 3)):
        o, nv = ref["oracle"][k], ref["naive"][k]
        assert max_err(got, o) <= max_err(nv, o) + tol["grad"] * max(1.0, o.abs().max().item())


def test_no_grad_entry_and_naive_impl_agree():
    hid, w, t = make(9, 16, 100, torch.float32)
    a = token_logprobs_no_grad(hid, w, t, impl="torch", with_entropy=True)
    b = token_logprobs(hid, w, t, impl="naive", with_entropy=True)
    assert not a.logp.requires_grad
    assert max_err(a.logp, b.logp) < 1e-5 and max_err(a.entropy, b.entropy) < 1e-5


def test_hand_computed_two_token_vocab():
    # logits = h @ W.T = [[2, 0]]; log softmax = [2 - log(e^2 + 1), -log(e^2 + 1)]
    hid = torch.tensor([[1.0, 0.0]])
    w = torch.tensor([[2.0, 0.0], [0.0, 5.0]])
    for impl in ("torch", "naive"):
        r = token_logprobs(hid, w, torch.tensor([1]), impl=impl, with_entropy=True)
        lse = torch.log(torch.exp(torch.tensor(2.0)) + 1)
        assert abs(r.logp.item() - (-lse.item())) < 1e-6
        p = torch.tensor([torch.exp(2 - lse), torch.exp(-lse)])
        assert abs(r.entropy.item() - (-(p * p.log()).sum()).item()) < 1e-6


def test_bad_inputs_raise_clear_errors():
    hid, w, t = make(4, 8, 10, torch.float32)
    with pytest.raises(ValueError, match="weight must be"):
        token_logprobs(hid, w[:, :4], t)
    with pytest.raises(ValueError, match="targets must be"):
        token_logprobs(hid, w, t[:2])
    with pytest.raises(ValueError, match="temperature"):
        token_logprobs(hid, w, t, temperature=0.0)
    with pytest.raises(ValueError, match="impl must be one of"):
        token_logprobs(hid, w, t, impl="cuda")
    with pytest.raises(ValueError, match="per-token losses"):
        token_loss(hid.requires_grad_(), w, t, lambda lp, i: lp.sum(), impl="torch")


@pytest.mark.parametrize("impl", ["torch", "naive"])
def test_targets_outside_the_vocabulary_are_refused_on_active_rows_only(impl):
    hid, w, t = make(4, 8, 10, torch.float32)
    bad = t.clone()
    bad[2] = -100                       # an ignore index: would wrap to the last row of W if indexed
    with pytest.raises(ValueError, match=r"targets of the active rows must lie in \[0, 10\)"):
        token_logprobs(hid, w, bad, impl=impl)
    bad[1] = 10
    with pytest.raises(ValueError, match="max 10"):
        token_loss(hid, w, bad, lambda lp, i: -lp, rows=torch.tensor([0, 1]), impl=impl)
    ignored = t.clone()
    ignored[2] = -100
    active = torch.tensor([0, 1, 3])    # leaving the ignored position out is the way to pass it
    r = token_logprobs(hid, w, ignored, rows=active, impl=impl)
    want = token_logprobs(hid, w, t, impl="naive").logp
    assert r.logp[2] == 0 and torch.allclose(r.logp[active], want[active], atol=1e-6)


@pytest.mark.slow
def test_large_vocab_128k():
    n, h, v = 64, 256, 131072
    hid, w, t = make(n, h, v, torch.float32, seed=11)
    lp_o, ent_o, _ = naive_token_logprobs(hid.double(), w.double(), t, 1.0, True)
    lp_n, ent_n, _ = naive_token_logprobs(hid, w, t, 1.0, True)
    r = token_logprobs(hid, w, t, impl="torch", with_entropy=True)
    assert max_err(r.logp, lp_o) <= max_err(lp_n, lp_o) + 2e-5
    assert max_err(r.entropy, ent_o) <= max_err(ent_n, ent_o) + 2e-5


def test_token_loss_refuses_a_second_backward_through_one_result():
    hid, w, t = make(4, 8, 10, torch.float32)
    h_ = hid.clone().requires_grad_()
    loss = token_loss(h_, w, t, lambda lp, i: -lp, impl="torch")
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="once"):
        loss.backward()


@pytest.mark.parametrize("impl", ["torch", "naive"])
@pytest.mark.parametrize("rows_pattern", ["all", "random"])
def test_token_loss_entropy_out_matches_the_oracle_and_leaves_the_loss_alone(impl, rows_pattern, tiling):
    n, h, v = 37, 61, 1000
    hid, w, t = make(n, h, v, torch.float32, seed=4)
    rows = row_index(rows_pattern, n)
    adv = torch.randn(n, generator=torch.Generator().manual_seed(6))
    loss_fn = lambda lp, idx: -adv[idx] * lp  # noqa: E731
    ref = oracle_and_naive(hid, w, t, rows, 0.7, -adv.double(), torch.zeros(n, dtype=torch.float64))
    ent = torch.full((n,), float("nan"))
    h_, w_ = hid.clone().requires_grad_(), w.clone().requires_grad_()
    loss = token_loss(h_, w_, t, loss_fn, rows=rows, temperature=0.7, impl=impl, chunk_rows=16, entropy_out=ent)
    loss.backward()
    o, nv = ref["oracle"][1], ref["naive"][1]          # entropy, 0 on inactive rows
    assert not ent.requires_grad and torch.isfinite(ent).all()
    assert max_err(ent, o) <= max_err(nv, o) + TOL[torch.float32]["entropy"] * max(1.0, o.abs().max().item())
    if rows is not None:
        assert torch.all(ent[torch.isin(torch.arange(n), rows, invert=True)] == 0)
    for got, k in ((h_.grad, 2), (w_.grad, 3)):       # the loss's gradients are those without entropy_out
        o, nv = ref["oracle"][k], ref["naive"][k]
        assert max_err(got, o) <= max_err(nv, o) + TOL[torch.float32]["grad"] * max(1.0, o.abs().max().item())
    with pytest.raises(ValueError, match=r"entropy_out must be a \(37,\) tensor"):
        token_loss(hid, w, t, loss_fn, impl=impl, entropy_out=torch.empty(3))


# ---------------------------------------------------------------------------------------------- frozen head
def _frozen_oracle(hid, w, t, rows, T, loss_of_logp):
    """float64 autograd oracle and the naive same-dtype yardstick of a frozen-head token_loss: the loss
    sum_{active} f(logp), its gradient w.r.t. hidden only, and the entropy (0 on inactive rows)."""
    out = {}
    for name, (h_, w_) in {"oracle": (hid.double(), w.double()), "naive": (hid, w)}.items():
        h_ = h_.detach().clone().requires_grad_()
        lp, ent, _ = naive_token_logprobs(h_, w_.detach(), t, T, with_entropy=True)
        mask = torch.zeros(hid.shape[0], dtype=torch.bool)
        mask[rows if rows is not None else slice(None)] = True
        idx = torch.nonzero(mask).view(-1)
        loss = loss_of_logp(lp.double()[idx], idx).sum()
        loss.backward()
        out[name] = (loss.detach(), (ent * mask).detach(), h_.grad)
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows_pattern", ROWS)
@pytest.mark.parametrize("T", [1.0, 0.7])
@pytest.mark.parametrize("with_entropy", [False, True])
def test_frozen_head_token_loss_matches_oracle(dtype, rows_pattern, T, with_entropy, tiling):
    """Weight without requires_grad: the single-sweep path (E_p[W] accumulated in the stats sweep) gives the
    loss, d loss / d hidden and the entropy of the float64 oracle, and leaves weight.grad None. The loss is
    nonlinear in logp (a mixed-sign advantage term and a square), so g = f'(logp) depends on the final logp."""
    n, h, v = 37, 61, 1000
    hid, w, t = make(n, h, v, dtype, seed=11)
    rows = row_index(rows_pattern, n)
    adv = torch.randn(n, generator=torch.Generator().manual_seed(12), dtype=torch.float64)
    loss_fn = lambda lp, idx: -adv[idx].to(lp.dtype) * torch.exp(lp) + 0.1 * lp ** 2  # noqa: E731
    ref = _frozen_oracle(hid, w, t, rows, T, loss_fn)
    h_ = hid.clone().requires_grad_()
    ent = torch.full((n,), float("nan")) if with_entropy else None
    loss = token_loss(h_, w, t, loss_fn, rows=rows, temperature=T, impl="torch", chunk_rows=16, entropy_out=ent)
    loss.backward()
    assert w.grad is None and not w.requires_grad
    tol = TOL[dtype]
    (lo, eo, gho), (ln, en, ghn) = ref["oracle"], ref["naive"]
    assert abs(loss.item() - lo.item()) <= abs(ln.item() - lo.item()) + tol["logp"] * n
    assert h_.grad.dtype == dtype and h_.grad.shape == hid.shape
    assert max_err(h_.grad, gho) <= max_err(ghn, gho) + tol["grad"] * max(1.0, gho.abs().max().item())
    if rows is not None and rows.numel() < n:
        inactive = torch.isin(torch.arange(n), rows, invert=True)
        assert torch.all(h_.grad[inactive] == 0)
    if with_entropy:
        assert max_err(ent, eo) <= max_err(en, eo) + tol["entropy"] * max(1.0, eo.abs().max().item())


def test_frozen_head_float64_is_exact(tiling):
    """float64 inputs run the torch path in float64: the frozen-head gradient equals autograd's to 1e-12."""
    n, h, v = 29, 13, 301
    hid, w, t = make(n, h, v, torch.float64, seed=13)
    rows = row_index("negatives", n)
    adv = torch.randn(n, generator=torch.Generator().manual_seed(14), dtype=torch.float64)
    loss_fn = lambda lp, idx: -adv[idx] * torch.exp(lp) + 0.1 * lp ** 2  # noqa: E731
    ref = _frozen_oracle(hid, w, t, rows, 0.6, loss_fn)["oracle"]
    h_ = hid.clone().requires_grad_()
    ent = torch.empty(n, dtype=torch.float64)
    token_loss(h_, w, t, loss_fn, rows=rows, temperature=0.6, impl="torch", chunk_rows=8, entropy_out=ent).backward()
    assert max_err(h_.grad, ref[2]) <= 1e-12 * max(1.0, ref[2].abs().max().item())
    assert max_err(ent, ref[1]) <= 1e-12


class _MatmulCount(torch.utils._python_dispatch.TorchDispatchMode):
    """Counts the (rows x vocabulary-tile) matmuls of the torch path: aten mm / addmm (the per-token target
    gathers use bmm and are not counted)."""

    def __init__(self):
        super().__init__()
        self.n = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket in (torch.ops.aten.mm, torch.ops.aten.addmm, torch.ops.aten.addmm_):
            self.n += 1
        return func(*args, **(kwargs or {}))


def test_frozen_head_is_one_sweep_of_two_matmuls_per_tile(monkeypatch):
    """The frozen path never enters the gradient sweep and issues exactly 2 matmuls per (row block, vocabulary
    tile): the logits tile and exp(z - m) @ W_tile. The trainable head, counted the same way, takes 4
    (stats, and in the gradient sweep logits, dh, dW), which shows the counter sees them."""
    import fastprerl.kernels.torch_logprob as tl
    monkeypatch.setattr(tl, "_ROW_BLOCK", 8)
    monkeypatch.setattr(tl, "_TILE_ELEMS", 8 * 48)
    monkeypatch.setattr(tl, "_MIN_VOCAB_TILE", 5)
    n, h, v = 37, 16, 200
    hid, w, t = make(n, h, v, torch.float32, seed=15)
    p = tl._plan(n, v, 1.0, False, 8)
    tiles = -(-n // p.row_block) * -(-v // p.vocab_tile)
    assert tiles > 20   # several row blocks and vocabulary tiles
    loss_fn = lambda lp, idx: -lp  # noqa: E731

    counts = {}
    for name, w_ in (("trainable", w.clone().requires_grad_()), ("frozen", w)):
        h_ = hid.clone().requires_grad_()
        with _MatmulCount() as c:
            token_loss(h_, w_, t, loss_fn, impl="torch", chunk_rows=8).backward()
        counts[name] = c.n
    assert counts == {"trainable": 4 * tiles, "frozen": 2 * tiles}

    def no_sweep(*a, **k):
        raise AssertionError("the frozen head must not run the gradient sweep")
    monkeypatch.setattr(tl, "_grad_sweep", no_sweep)
    h_ = hid.clone().requires_grad_()
    token_loss(h_, w, t, loss_fn, impl="torch", chunk_rows=8).backward()
    assert w.grad is None and h_.grad is not None and torch.isfinite(h_.grad).all()
