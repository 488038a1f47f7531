"""The fused log-prob op as torch custom operators (kernels/ops.py): values and gradients against the naive
oracle, fake tensors, torch.library.opcheck, and a compiled step with fullgraph=True (no graph break)."""
from __future__ import annotations

import pytest
import torch

from fastprerl.kernels import token_logprobs, token_loss
from fastprerl.kernels.ops import token_logprobs_op
from fastprerl.kernels.reference import naive_token_logprobs


def _inputs(n=37, h=24, v=301, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=g, dtype=torch.float64).requires_grad_(True)
    weight = torch.randn(v, h, generator=g, dtype=torch.float64).requires_grad_(True)
    targets = torch.randint(0, v, (n,), generator=g)
    return hidden, weight, targets


@pytest.mark.parametrize("impl", ["torch", "naive"])
def test_op_values_and_gradients_match_the_oracle(impl):
    hidden, weight, targets = _inputs()
    logp, ent, lse = token_logprobs_op(hidden, weight, targets, 0.7, True, impl)
    (logp.sum() + 0.5 * ent.sum()).backward()
    dh, dw = hidden.grad.clone(), weight.grad.clone()
    hidden.grad = weight.grad = None
    ref_logp, ref_ent, _ = naive_token_logprobs(hidden, weight, targets, 0.7, True)
    (ref_logp.sum() + 0.5 * ref_ent.sum()).backward()
    assert logp.dtype == torch.float64   # float64 inputs stay float64
    torch.testing.assert_close(logp, ref_logp, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(ent, ref_ent, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(dh, hidden.grad, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(dw, weight.grad, rtol=1e-10, atol=1e-10)


def test_op_on_fake_tensors():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        h = torch.empty(5000, 256, dtype=torch.bfloat16, requires_grad=True)
        w = torch.empty(151936, 256, dtype=torch.bfloat16, requires_grad=True)
        t = torch.zeros(5000, dtype=torch.long)
        logp, ent, lse = token_logprobs_op(h, w, t, 1.0, False, "torch")
        assert logp.shape == (5000,) and logp.dtype == torch.float32 and ent.shape == (0,)
        logp.sum().backward()
        assert h.grad.shape == h.shape and w.grad.shape == w.shape


def test_opcheck():
    hidden, weight, targets = _inputs(n=9, h=8, v=40)
    hidden, weight = hidden.float(), weight.float()
    torch.library.opcheck(token_logprobs_op, (hidden.detach().requires_grad_(), weight.detach().requires_grad_(),
                                              targets, 1.0, True, "torch"))


def test_compiled_step_fullgraph_matches_eager():
    hidden, weight, targets = _inputs(n=33, h=16, v=257)
    hidden, weight = hidden.detach().float(), weight.detach().float()
    adv = torch.linspace(-1, 1, 33)

    def step(h, w):
        loss = token_loss(h, w, targets, lambda lp, i: -adv[i] * lp, temperature=0.9, impl="torch")
        lp = token_logprobs(h, w, targets, temperature=0.9, impl="torch").logp
        return loss + 0.1 * lp.sum()

    def grads(fn):
        h, w = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
        out = fn(h, w)
        out.backward()
        return out.detach(), h.grad, w.grad

    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")   # raises on any graph break
    for a, b in zip(grads(compiled), grads(step)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
