"""Hugging Face `generate` backend: batched sampling with left padding, behaviour log-probs kept."""
from __future__ import annotations

import inspect

import torch
from transformers import LogitsProcessor, LogitsProcessorList, StoppingCriteria, StoppingCriteriaList

from .base import Rollout, RolloutBatch, newline_token_ids


class _BehaviourLogprobs(LogitsProcessor):
    """Records log softmax(logits / T) of each sampled token without keeping (steps x vocab) logits.

    Custom processors run before generate's temperature / top-p warpers, so `scores` are the model's
    logits. At step t the token sampled at step t-1 is the last column of input_ids: gather it from the
    previous step's log-probs; the final token is gathered by `finish`. Memory: one (batch, vocab) buffer.
    """

    def __init__(self, temperature: float, prompt_len: int):
        self.inv_t, self.prompt_len = 1.0 / temperature, prompt_len
        self.prev, self.out = None, []

    def __call__(self, input_ids, scores):
        if self.prev is not None:
            self.out.append(self.prev.gather(1, input_ids[:, -1:]).squeeze(1))
        self.prev = torch.log_softmax(scores.float() * self.inv_t, dim=-1)
        return scores

    def finish(self, sequences) -> torch.Tensor:
        """(batch, generated) log-probs of sequences[:, prompt_len:]."""
        n_gen = sequences.shape[1] - self.prompt_len
        if n_gen > len(self.out) and self.prev is not None:
            self.out.append(self.prev.gather(1, sequences[:, -1:]).squeeze(1))
        self.prev = None
        if not self.out:
            return torch.zeros(sequences.shape[0], 0)
        return torch.stack(self.out[:n_gen], dim=1)


class _StopOnTokens(StoppingCriteria):
    """Finishes a sequence once its last token is in `ids` (e.g. every token containing a newline)."""

    def __init__(self, ids, device):
        self.ids = torch.tensor(sorted(ids), device=device)

    def __call__(self, input_ids, scores, **kwargs):
        return torch.isin(input_ids[:, -1], self.ids)


class HFRollout(Rollout):
    """Samples from the trainer's model itself: the interface's no-op weight sync and sleep apply."""

    def __init__(self, cfg, model, tokenizer):
        self.cfg, self.model, self.tok = cfg, model, tokenizer
        self.eos = tokenizer.eos_token_id
        self.pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eos
        self.newline_ids = None
        # transformers renamed the cache argument ("past_key_values" -> "cache"); use what forward takes
        params = inspect.signature(model.forward).parameters
        self.cache_kwarg = "cache" if "cache" in params else "past_key_values"
        if cfg.stop_at_newline:
            self.newline_ids = newline_token_ids(tokenizer)

    def _shared_prefix_cache(self, ids, att, n):
        """KV cache of every prompt but its last token, computed once per prompt and repeated n times,
        so the G samples of a group do not each pay for the prompt's forward."""
        from transformers import DynamicCache

        cache = DynamicCache(config=self.model.config)
        pos = (att.cumsum(-1) - 1).clamp(min=0)
        self.model(input_ids=ids[:, :-1], attention_mask=att[:, :-1], position_ids=pos[:, :-1],
                   use_cache=True, **{self.cache_kwarg: cache})
        cache.batch_repeat_interleave(n)
        return cache

    @torch.no_grad()
    def generate(self, prompts: list[list[int]], n: int) -> RolloutBatch:
        cfg, model = self.cfg, self.model
        dev = next(model.parameters()).device
        flat = [p for p in prompts for _ in range(n)]
        was_training = model.training
        model.eval()
        model.config.use_cache = True
        resp, logps, trunc = [], [], []
        per_call = max(1, cfg.generation_batch_size // n)  # prompts per generate() call
        try:
            for s in range(0, len(prompts), per_call):
                chunk = prompts[s:s + per_call]
                L = max(len(p) for p in chunk)
                ids = torch.full((len(chunk), L), self.pad, dtype=torch.long)
                att = torch.zeros((len(chunk), L), dtype=torch.long)
                for i, p in enumerate(chunk):
                    ids[i, L - len(p):] = torch.tensor(p)
                    att[i, L - len(p):] = 1
                ids, att = ids.to(dev), att.to(dev)
                extra = {}
                if self.newline_ids is not None:
                    extra["stopping_criteria"] = StoppingCriteriaList([_StopOnTokens(self.newline_ids, dev)])
                if n > 1 and L > 1:
                    extra[self.cache_kwarg] = self._shared_prefix_cache(ids, att, n)
                recorder = _BehaviourLogprobs(cfg.temperature, L)
                # synced_gpus off: under torchrun the weights are gathered for the whole call
                # (distributed.full_weights), so no forward needs another rank and each rank (rank 0 alone in a
                # periodic evaluation) stops when its own sequences are done; transformers would otherwise turn
                # it on for an FSDP model and all-reduce a "finished" flag after every token
                out = model.generate(
                    input_ids=ids.repeat_interleave(n, 0), attention_mask=att.repeat_interleave(n, 0),
                    do_sample=True, temperature=cfg.temperature, top_p=cfg.top_p, top_k=0,
                    max_new_tokens=cfg.max_new_tokens, eos_token_id=self.eos, pad_token_id=self.pad,
                    logits_processor=LogitsProcessorList([recorder]), return_dict_in_generate=True,
                    synced_gpus=False, **extra)
                gen = out.sequences[:, L:].cpu()
                # behaviour log-probs of the sampled tokens under logits / T (the quantity the trainer scores;
                # with top_p < 1 the sampler drew from the truncated distribution, this is the full one)
                lp = recorder.finish(out.sequences).cpu()
                for i in range(gen.shape[0]):
                    toks = gen[i].tolist()
                    end, hit = len(toks), False
                    for j, t in enumerate(toks):
                        if t == self.eos or (self.newline_ids is not None and t in self.newline_ids):
                            end, hit = j + 1, True
                            break
                    resp.append(toks[:end])
                    logps.append(lp[i, :end].tolist())
                    trunc.append(not hit)
        finally:
            model.config.use_cache = False
            model.train(was_training)
        return RolloutBatch(prompt_ids=flat, response_ids=resp, behaviour_logp=logps, truncated=trunc)
