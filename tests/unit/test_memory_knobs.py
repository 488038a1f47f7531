"""Memory knobs of the single-GPU mode: optimizer-state offload and gradient checkpointing give the same
training as without them (CPU, fp32)."""
from pathlib import Path

import pytest
import torch

from fastprerl.kernels import token_loss
from fastprerl.models import lm_head_weight, load_model
from fastprerl.optim import CPUOffloadAdamW
from fastprerl.packing import pack
from fastprerl.passes import bins

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "configs" / "tiny.toml"
HP = dict(lr=1e-2, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.1)


def test_offloaded_adamw_equals_adamw_step_for_step():
    torch.manual_seed(0)
    a = torch.nn.Linear(7, 5)
    b = torch.nn.Linear(7, 5)
    b.load_state_dict(a.state_dict())
    ref = torch.optim.AdamW(a.parameters(), **HP)
    off = CPUOffloadAdamW(b.parameters(), **HP)
    x = torch.randn(11, 7)
    for step in range(4):
        for m, opt in ((a, ref), (b, off)):
            opt.zero_grad()
            m(x).pow(2).sum().backward()
            opt.step()
        assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters())), step
        if step == 1:  # weights changed outside the optimizer (e.g. a checkpoint load) are picked up
            with torch.no_grad():
                for m in (a, b):
                    m.weight.mul_(0.5)
    # zero_grad clears the model's gradients too; the state is AdamW's, keyed by the CPU copies
    off.zero_grad(set_to_none=True)
    assert all(p.grad is None for p in b.parameters())
    for pr, pc in zip(ref.param_groups[0]["params"], off.param_groups[0]["params"]):
        assert torch.equal(ref.state[pr]["exp_avg_sq"], off.state[pc]["exp_avg_sq"])
        assert off.state[pc]["exp_avg"].device.type == "cpu"
    # state_dict round trip into a fresh offloaded optimizer
    again = CPUOffloadAdamW(b.parameters(), **HP)
    again.load_state_dict(off.state_dict())
    assert torch.equal(again.state[again.param_groups[0]["params"][0]]["exp_avg"],
                       off.state[off.param_groups[0]["params"][0]]["exp_avg"])


def _layer_calls(model):
    """Counts the MLP forwards of every decoder layer (a checkpointed layer runs its MLP again in backward).
    The count wraps `mlp.forward` itself: module hooks do not fire during transformers' recomputation."""
    calls = []
    for layer in model.model.layers:
        def counted(*args, _orig=layer.mlp.forward, **kwargs):
            calls.append(1)
            return _orig(*args, **kwargs)
        layer.mlp.forward = counted
    return calls


@pytest.mark.usefixtures("one_torch_thread")
def test_gradient_checkpointing_is_honoured_and_leaves_loss_and_grads_unchanged():
    plain = load_model("builtin:tiny-llama", dtype="float32", seed=3)
    ckpt = load_model("builtin:tiny-llama", dtype="float32", seed=3, gradient_checkpointing=True)
    flags = lambda m: [layer.gradient_checkpointing for layer in m.model.layers]
    assert all(flags(ckpt)) and not any(flags(plain))
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, 49152, (n,), generator=g).tolist() for n in (4, 9, 2)]
    responses = [torch.randint(3, 49152, (n,), generator=g).tolist() for n in (5, 3, 11)]
    adv = torch.tensor([0.5, -1.0, 2.0])
    b = pack(prompts, responses, cond=[True] * 3, free=[True, False, True], empty_token=1, max_tokens=16)
    n_tok = b.rows.numel()

    out = {}
    for name, model in (("plain", plain), ("ckpt", ckpt)):
        calls = _layer_calls(model)
        model.train()
        loss = 0.0
        for ridx, h, targets in bins(model, b):   # the training pass: forward, fused loss, backward per bin
            part = token_loss(h, lm_head_weight(model), targets, lambda lp, i: -adv[b.row_sample[ridx[i]]] * lp / n_tok,
                              temperature=0.7, impl="torch")
            part.backward()
            loss += part.item()
        out[name] = (loss, [p.grad.clone() for p in model.parameters()], len(calls))
    n_layer_passes = len(b.bins) * plain.config.num_hidden_layers
    assert out["plain"][2] == n_layer_passes           # one forward per layer and bin
    assert out["ckpt"][2] == 2 * n_layer_passes        # recomputed in the backward: checkpointing is on
    assert abs(out["plain"][0] - out["ckpt"][0]) < 1e-7
    for a, c in zip(out["plain"][1], out["ckpt"][1]):
        assert torch.allclose(a, c, atol=1e-7, rtol=1e-6)
