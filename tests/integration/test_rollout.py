"""HF rollout backend: shared-prefix generation equals plain generate, log-probs are the sampler's."""
import pytest
import torch
from transformers import AutoModelForCausalLM

from fastprerl.config import RolloutConfig
from fastprerl.models import tiny_config
from fastprerl.rollout.hf import HFRollout


class _Tok:
    eos_token_id, pad_token_id = 2, 2


@pytest.mark.parametrize("top_p", [1.0, 0.9])
def test_shared_prefix_generation_matches_plain_generate_and_logprobs(top_p):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config("llama", 300)).eval()
    prompts = [[5, 6, 7, 8, 9], [10, 11, 12], [13]]
    cfg = RolloutConfig(max_new_tokens=6, temperature=0.8, top_p=top_p, generation_batch_size=64)
    roll = HFRollout(cfg, model, _Tok())
    torch.manual_seed(3)
    out = roll.generate(prompts, 3)
    assert len(out.response_ids) == 9 and out.prompt_ids[3] == prompts[1]

    # plain HF generate on the expanded, left-padded batch with the same seed samples the same tokens
    L = 5
    ids = torch.full((3, L), 2)
    att = torch.zeros(3, L, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, L - len(p):] = torch.tensor(p)
        att[i, L - len(p):] = 1
    torch.manual_seed(3)
    with torch.no_grad():
        ref = model.generate(input_ids=ids.repeat_interleave(3, 0), attention_mask=att.repeat_interleave(3, 0),
                             do_sample=True, temperature=0.8, top_p=top_p, top_k=0, max_new_tokens=6, eos_token_id=2,
                             pad_token_id=2)
    for i in range(9):
        got = out.response_ids[i]
        assert ref[i, L:L + len(got)].tolist() == got
        # nothing is cut early: the full max_new_tokens without EOS, else up to and including the first EOS
        assert (len(got) == 6 and 2 not in got) if out.truncated[i] else got.index(2) == len(got) - 1

    # behaviour log-probs equal an unpadded forward's log softmax(logits / T) at the sampled tokens
    for i in range(9):
        seq = out.prompt_ids[i] + out.response_ids[i]
        with torch.no_grad():
            logits = model(torch.tensor([seq])).logits[0] / 0.8
        lsm = torch.log_softmax(logits.double(), -1)
        k = len(out.prompt_ids[i])
        want = lsm[k - 1:-1].gather(1, torch.tensor(out.response_ids[i]).view(-1, 1)).view(-1)
        assert torch.allclose(torch.tensor(out.behaviour_logp[i], dtype=torch.float64), want, atol=1e-4)


@pytest.mark.usefixtures("one_torch_thread")
def test_lengths_eos_newline_stops_and_truncation_with_smollm2():
    """SmolLM2-135M-Instruct and its tokenizer on additions: a response ends at its first stop token (EOS, or
    with stop_at_newline any token whose text holds a newline), inclusive, and only there; a response without
    one has exactly max_new_tokens tokens and is flagged truncated; one behaviour log-prob per token. The seed
    gives newline stops, EOS stops and truncations (checked, so that every rule is exercised)."""
    from fastprerl.config import DataConfig
    from fastprerl.data import addition_problems, format_prompt
    from fastprerl.models import load_model, load_tokenizer
    from fastprerl.rollout import newline_token_ids

    tok, model = load_tokenizer("builtin:smollm2-135m"), load_model("builtin:smollm2-135m")
    newline = newline_token_ids(tok)
    assert tok.convert_tokens_to_ids("Ċ") in newline and tok.eos_token_id not in newline   # "\n" is Ċ in BPE
    seen = {"newline": 0, "eos": 0, "truncated": 0}
    problems = addition_problems(4, 2, 0)
    for fmt, max_new, stop_nl in (("completion", 6, True), ("chat", 10, False)):
        prompts = [format_prompt(p, DataConfig(format=fmt), tok) for p in problems]
        roll = HFRollout(RolloutConfig(max_new_tokens=max_new, stop_at_newline=stop_nl), model, tok)
        torch.manual_seed(0)
        out = roll.generate(prompts, 4)
        stops = newline | {tok.eos_token_id} if stop_nl else {tok.eos_token_id}
        assert out.prompt_ids == [p for p in prompts for _ in range(4)]
        for resp, lp, trunc in zip(out.response_ids, out.behaviour_logp, out.truncated):
            at = [j for j, t in enumerate(resp) if t in stops]
            assert len(lp) == len(resp) and all(v <= 0 for v in lp)
            if trunc:
                assert len(resp) == max_new and at == []
                seen["truncated"] += 1
            else:
                assert 1 <= len(resp) <= max_new and at == [len(resp) - 1]
                if resp[-1] == tok.eos_token_id:
                    seen["eos"] += 1
                else:
                    assert "\n" in tok.decode(resp[-1:]) and stop_nl
                    seen["newline"] += 1
    assert all(n > 0 for n in seen.values()), seen
