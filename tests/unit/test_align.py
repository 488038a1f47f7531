"""Gradient alignment: the packed one-forward computation against a direct float64 autograd oracle,
the summary statistics, and `fastprerl align` end to end on a tiny model."""
import json
import math

import pytest
import torch
from transformers import AutoModelForCausalLM

from fastprerl.cli import main
from fastprerl.config import LoraConfig
from fastprerl.evaluation.align import (
    Alignment,
    rollout_alignment,
    select_params,
    summarise_alignment,
)
from fastprerl.lora import wrap
from fastprerl.models import tiny_config

E = 1  # empty-context token of the tiny models


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_torch_thread):
    yield


def oracle(model, prompt, response, params, temperature):
    """Two separate unpadded forwards with full logits and log_softmax; autograd.grad per view."""
    def view_logp(context):
        seq = torch.tensor([list(context) + list(response)])
        logits = model(seq).logits[0] / temperature
        lsm = torch.log_softmax(logits, dim=-1)
        k = len(context)
        return lsm[k - 1:-1].gather(1, torch.tensor(response).view(-1, 1)).view(-1)

    lp_c, lp_f = view_logp(prompt), view_logp([E])
    g_c = torch.autograd.grad(lp_c.sum(), params, allow_unused=True)
    g_f = torch.autograd.grad(lp_f.sum(), params, allow_unused=True)
    z = lambda g, p: torch.zeros_like(p) if g is None else g
    g_c = [z(g, p) for g, p in zip(g_c, params)]
    g_f = [z(g, p) for g, p in zip(g_f, params)]
    inner = sum((a * b).sum() for a, b in zip(g_f, g_c)).item()
    nc = math.sqrt(sum((a * a).sum() for a in g_c).item())
    nf = math.sqrt(sum((a * a).sum() for a in g_f).item())
    return inner, inner / (nc * nf), nc, nf, (lp_c - lp_f).detach()


@pytest.fixture(scope="module", params=["llama", "qwen2", "llama+lora"])
def model64(request):
    kind, _, lora = request.param.partition("+")
    torch.manual_seed(0)
    m = AutoModelForCausalLM.from_config(tiny_config(kind, 300), attn_implementation="sdpa")
    if lora:   # what `fastprerl align` loads for a LoRA run: the adapter's parameters are the trainable ones
        m = wrap(m, LoraConfig(r=4, alpha=8))
        with torch.no_grad():
            for n, p in m.named_parameters():
                if "lora_B" in n:
                    p.normal_(std=0.1)    # B = 0 (PEFT's start) would give the gradient of A zero
        assert all("lora_" in n for n, p in m.named_parameters() if p.requires_grad)
    return m.double().eval()


@pytest.mark.parametrize("temperature,pattern", [(1.0, None), (0.7, None), (1.0, r"mlp|embed")])
def test_alignment_matches_direct_float64_autograd(model64, temperature, pattern):
    g = torch.Generator().manual_seed(7)
    params = [p for _, p in select_params(model64, pattern)]
    if pattern:
        assert 0 < len(params) < len(list(model64.parameters()))
    for lp_, lr_ in [(6, 9), (1, 1), (13, 4)]:
        prompt = torch.randint(3, 300, (lp_,), generator=g).tolist()
        response = torch.randint(3, 300, (lr_,), generator=g).tolist()
        got = rollout_alignment(model64, prompt, response, empty_token=E, params=params,
                                temperature=temperature, impl="torch")
        inner, cos, nc, nf, diff = oracle(model64, prompt, response, params, temperature)
        assert got.inner == pytest.approx(inner, rel=1e-8)
        assert got.cosine == pytest.approx(cos, rel=1e-8)
        assert got.norm_cond == pytest.approx(nc, rel=1e-8) and got.norm_free == pytest.approx(nf, rel=1e-8)
        assert len(got.token_diff) == lr_
        assert torch.allclose(torch.tensor(got.token_diff, dtype=torch.float64), diff, rtol=1e-8, atol=1e-10)
        assert got.logp_cond - got.logp_free == pytest.approx(diff.sum().item(), rel=1e-8, abs=1e-10)
    assert all(p.grad is None for p in model64.parameters())  # autograd.grad leaves .grad alone


def test_select_params_errors(model64):
    with pytest.raises(ValueError, match="matches no"):
        select_params(model64, "no_such_param")
    with pytest.raises(ValueError, match="regular expression"):
        select_params(model64, "(")


def test_summary_statistics_by_hand():
    rows = [Alignment(inner=2.0, cosine=0.5, norm_cond=1, norm_free=4, logp_cond=-1, logp_free=-3,
                      token_diff=[1.0, -1.0, 0.5, 0.5, 0.0, 2.0, -2.0]),
            Alignment(inner=-1.0, cosine=-0.1, norm_cond=3, norm_free=2, logp_cond=-2, logp_free=-1,
                      token_diff=[-0.5]),
            Alignment(inner=5.0, cosine=0.9, norm_cond=2, norm_free=3, logp_cond=-4, logp_free=-5,
                      token_diff=[0.25, 0.25])]
    s = summarise_alignment(rows)
    assert s["n"] == 3
    assert s["inner_mean"] == pytest.approx(2.0)           # (2 - 1 + 5) / 3
    assert (s["inner_min"], s["inner_max"], s["inner_median"]) == (-1.0, 5.0, 2.0)
    assert s["inner_frac_negative"] == pytest.approx(1 / 3)
    assert s["cosine_mean"] == pytest.approx(1.3 / 3)       # (0.5 - 0.1 + 0.9) / 3
    assert s["grad_norm_cond_mean"] == pytest.approx(2.0) and s["grad_norm_free_mean"] == pytest.approx(3.0)
    # first 5 tokens of each rollout: |1|,|-1|,|.5|,|.5|,|0|, |-.5|, |.25|,|.25| -> 4.0 / 8 = 0.5
    assert s["token_abs_diff_first5"] == pytest.approx(0.5)
    # the rest: |2|, |-2| -> 2.0
    assert s["token_abs_diff_rest"] == pytest.approx(2.0)
    # all 10 tokens: (4.0 + 4.0) / 10
    assert s["token_abs_diff_mean"] == pytest.approx(0.8)
    assert s["token_diff_mean"] == pytest.approx((1 - 1 + 0.5 + 0.5 + 0 + 2 - 2 - 0.5 + 0.25 + 0.25) / 10)
    assert summarise_alignment([]) == {"n": 0}


def test_align_end_to_end_on_a_tiny_model(tmp_path, capsys):
    out = tmp_path / "align.json"
    argv = ["align", "builtin:tiny-llama", "--data", "builtin:addition", "--n", "3", "--samples-per-prompt", "2",
            "--max-new-tokens", "4", "--out", str(out), "--params", "layers\\.1\\.", "--reward-timeout", "2"]
    assert main(argv) == 0
    assert "inner mean" in capsys.readouterr().out
    rep = json.loads(out.read_text())
    assert rep["settings"]["n_param_tensors"] > 0 and rep["settings"]["params"] == "layers\\.1\\."
    assert rep["settings"]["empty_token"] == 1   # SmolLM2's BOS <|im_start|>
    rolls = rep["rollouts"]
    assert len(rolls) == 3 and [(r["problem"], r["sample"]) for r in rolls] == [(0, 0), (0, 1), (1, 0)]
    for r in rolls:
        assert -1 - 1e-9 <= r["cosine"] <= 1 + 1e-9 and r["grad_norm_cond"] > 0 and r["grad_norm_free"] > 0
        assert len(r["token_diff"]) == r["tokens"] and 1 <= r["tokens"] <= 4
        assert r["logp_cond"] < 0 and r["logp_free"] < 0
    s = rep["datasets"]["builtin:addition"]
    assert s["n"] == 3 and rep["overall"]["n"] == 3
    assert s["inner_mean"] == pytest.approx(sum(r["inner"] for r in rolls) / 3)
    assert 0 <= s["inner_frac_negative"] <= 1
    assert s["correct"]["n"] + s["wrong"]["n"] == 3
    # a bad regex is a clean exit 2
    assert main(argv[:-6] + ["--params", "nothing_matches"]) == 2
    assert "matches no trainable parameter" in capsys.readouterr().err
