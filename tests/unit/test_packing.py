"""One-pass packing: packed log P(y|x) and log P(y) equal separate unpadded forwards (fp32, 1e-5)."""
import pytest
import torch
from transformers import AutoModelForCausalLM

from fastprerl.kernels import token_logprobs
from fastprerl.models import tiny_config
from fastprerl.packing import pack
from fastprerl.passes import packed_hidden

E = 1  # empty-context token id used in these tests


def separate_logprobs(model, context, response):
    """log p(response | context) from one unpadded forward over [context; response] with full logits."""
    seq = torch.tensor([list(context) + list(response)])
    with torch.no_grad():
        logits = model(seq).logits[0].double()
    lsm = torch.log_softmax(logits, dim=-1)
    k = len(context)
    return lsm[k - 1:-1].gather(1, torch.tensor(response).view(-1, 1)).view(-1)


def rand_seqs(lengths, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 500, (n,), generator=g).tolist() for n in lengths]


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def model(request):
    torch.manual_seed(0)
    m = AutoModelForCausalLM.from_config(tiny_config(request.param, 500), attn_implementation="sdpa")
    return m.eval()


@pytest.mark.parametrize("max_tokens", [16, 4096])
def test_both_views_match_separate_forwards(model, max_tokens):
    prompts = rand_seqs([5, 1, 9, 3, 12], seed=1)
    responses = rand_seqs([4, 1, 7, 0, 11], seed=2)  # includes a length-1 and an empty response
    cond = [True, True, True, True, False]
    free = [True, False, True, True, True]
    batch = pack(prompts, responses, cond=cond, free=free, empty_token=E, max_tokens=max_tokens)
    assert all(e - s <= max(max_tokens, max(batch.seq_lens)) for s, e in batch.bins)
    with torch.no_grad():
        hidden = packed_hidden(model, batch)
        r = token_logprobs(hidden[batch.rows], model.get_output_embeddings().weight, batch.targets,
                           impl="torch")
    got = {v: batch.unpack(r.logp, v) for v in ("cond", "free")}
    checked = 0
    for i, (x, y) in enumerate(zip(prompts, responses)):
        for view, ctx, on in (("cond", x, cond[i]), ("free", [E], free[i])):
            if not on or not y:
                assert got[view][i].numel() == 0
                continue
            ref = separate_logprobs(model, ctx, y)
            assert torch.allclose(got[view][i].double(), ref, atol=1e-5, rtol=0), (i, view)
            checked += 1
    assert checked == 6


def test_positions_restart_and_rows_point_at_predecessors():
    batch = pack([[10, 11], [12]], [[20, 21, 22], [23]], cond=[True, True], free=[True, False],
                 empty_token=E, max_tokens=100)
    # stream: [10 11 20 21 22] [12 23] [E 20 21 22]
    assert batch.input_ids.tolist() == [10, 11, 20, 21, 22, 12, 23, E, 20, 21, 22]
    assert batch.position_ids.tolist() == [0, 1, 2, 3, 4, 0, 1, 0, 1, 2, 3]
    assert batch.rows.tolist() == [1, 2, 3, 5, 7, 8, 9]
    assert batch.targets.tolist() == [20, 21, 22, 23, 20, 21, 22]
    assert batch.input_ids[batch.rows + 1].tolist() == batch.targets.tolist()
    assert batch.row_view.tolist() == [0, 0, 0, 0, 1, 1, 1]


def test_only_selected_views_are_packed():
    # NSR-PreRL: prompt-free view of negative samples only; positives must not appear at all
    prompts, responses = rand_seqs([4, 4, 4, 4], 3), rand_seqs([5, 6, 7, 8], 4)
    negative = [False, True, False, True]
    batch = pack(prompts, responses, free=negative, empty_token=E)
    assert set(batch.row_sample.tolist()) == {1, 3}
    assert batch.num_tokens == (1 + 6) + (1 + 8)
    assert batch.view_rows["cond"].numel() == 0


def test_everything_masked_gives_empty_batch(model):
    batch = pack(rand_seqs([3, 3], 5), rand_seqs([2, 2], 6), cond=[False, False], free=[False, False],
                 empty_token=E)
    assert batch.num_tokens == 0 and batch.bins == [] and batch.rows.numel() == 0
    hidden = packed_hidden(model, batch)
    assert hidden.shape == (0, model.config.hidden_size)
    r = token_logprobs(hidden[batch.rows], model.get_output_embeddings().weight, batch.targets, impl="torch")
    assert r.logp.numel() == 0


def test_bad_masks_raise():
    with pytest.raises(ValueError, match="view 'free'"):
        pack([[1]], [[2]], free=[True, False], empty_token=E)


def test_packed_sdpa_attends_per_sequence_and_matches_the_dense_mask(model, monkeypatch):
    """SDPA models run packed bins sequence by sequence (no bin x bin mask); values and gradients equal
    the dense block-diagonal mask path (eager attention) of the same packed bin."""
    import copy

    import torch.nn.functional as F

    from fastprerl.attention import VARLEN_SDPA

    prompts, responses = rand_seqs([5, 2, 9], seed=3), rand_seqs([4, 6, 1], seed=4)
    batch = pack(prompts, responses, cond=[True] * 3, free=[True] * 3, empty_token=E, max_tokens=4096)
    assert len(batch.bins) == 1 and len(batch.seq_lens) == 6
    dense = copy.deepcopy(model)
    dense.set_attn_implementation("eager")
    seen = []
    real = F.scaled_dot_product_attention

    def spy(q, *a, **kw):
        seen.append((q.shape[2], kw.get("is_causal")))
        return real(q, *a, **kw)

    g = torch.randn(batch.num_tokens, model.config.hidden_size, generator=torch.Generator().manual_seed(5))
    grads = {}
    for name, m in (("varlen", model), ("dense", dense)):
        m.zero_grad(set_to_none=True)
        with monkeypatch.context() as mp:
            mp.setattr(F, "scaled_dot_product_attention", spy)
            h = packed_hidden(m, batch)
        (h * g).sum().backward()
        grads[name] = (h.detach(), [p.grad.clone() for p in m.parameters()])
    assert model.config._attn_implementation == VARLEN_SDPA
    assert dense.config._attn_implementation == "eager"
    layers = model.config.num_hidden_layers
    assert seen == [(n, True) for _ in range(layers) for n in batch.seq_lens]  # only the varlen model calls SDPA
    (hv, gv), (hd, gd) = grads["varlen"], grads["dense"]
    assert torch.allclose(hv, hd, atol=1e-5, rtol=0)
    for a, b in zip(gv, gd):
        assert (a - b).abs().max() <= 1e-5 * max(1.0, b.abs().max().item()), (a - b).abs().max()
    model.zero_grad(set_to_none=True)
