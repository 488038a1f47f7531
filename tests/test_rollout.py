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

    # behaviour log-probs equal an unpadded forward's log softmax(logits / T) at the sampled tokens
    for i in range(9):
        seq = out.prompt_ids[i] + out.response_ids[i]
        with torch.no_grad():
            logits = model(torch.tensor([seq])).logits[0] / 0.8
        lsm = torch.log_softmax(logits.double(), -1)
        k = len(out.prompt_ids[i])
        want = lsm[k - 1:-1].gather(1, torch.tensor(out.response_ids[i]).view(-1, 1)).view(-1)
        assert torch.allclose(torch.tensor(out.behaviour_logp[i], dtype=torch.float64), want, atol=1e-4)
