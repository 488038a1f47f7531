"""The view probe: does the model, with and without the prompt, prefer a right response to a wrong one?

For every problem that carries a "probe" ({"right": text, "wrong": text}; builtin:equations makes one, with
the wrong sum one of +-1, +-2, +-10 away from the right one) it scores both responses in both views:

  cond   log P(y | x) = sum_t log P(y_t | x, y_<t)        (the prompt as the policy sees it)
  free   log P(y | e) = sum_t log P(y_t | e, y_<t)        (e: the empty-context token, positions from 0)

and reports per view the fraction of problems where log P(right) > log P(wrong) (`prefers_right`) and the
mean log-prob of the right and of the wrong responses (nats per response). Before training it says whether
log P(y) alone can tell a right answer from a wrong one (a task where it cannot leaves NSR-PreRL nothing to
prune); during training, whether pruning the prompt-free view moves the prompt-conditioned one.

A plain forward with a log-softmax in float32 over the response positions only: an independent path from the
fused kernels.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = ["has_probe", "view_probe"]


def has_probe(problems: Sequence[dict]) -> bool:
    return bool(problems) and all(isinstance(p.get("probe"), dict) for p in problems)


@torch.no_grad()
def _sequence_logps(model, contexts: list[list[int]], responses: list[list[int]], batch: int = 64) -> list[float]:
    """sum of log P(response tokens | context, earlier response tokens) per pair. Left-padded batches (positions
    from each sequence's first real token), so every response ends at the last column and the logits are
    computed only for the last max(len(response)) + 1 columns, not over the vocabulary at every prompt token."""
    device = next(model.parameters()).device
    out = []
    for lo in range(0, len(contexts), batch):
        ctx, resp = contexts[lo:lo + batch], responses[lo:lo + batch]
        seqs = [c + r for c, r in zip(ctx, resp)]
        width, keep = max(len(s) for s in seqs), max(len(r) for r in resp) + 1
        ids = torch.zeros(len(seqs), width, dtype=torch.long)
        mask = torch.zeros(len(seqs), width, dtype=torch.long)
        for i, s in enumerate(seqs):
            ids[i, width - len(s):] = torch.tensor(s)
            mask[i, width - len(s):] = 1
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device), position_ids=pos.to(device),
                       logits_to_keep=keep).logits.float()                 # (b, keep, V): columns width-keep..
        logp = torch.log_softmax(logits[:, :-1], dim=-1)                   # predicts columns width-keep+1..
        targets = ids[:, width - keep + 1:].to(device)
        tok_lp = logp.gather(-1, targets[..., None])[..., 0]               # (b, keep-1)
        for i, r in enumerate(resp):
            out.append(float(tok_lp[i, tok_lp.shape[1] - len(r):].sum()))
    return out


def view_probe(model, tokenizer, problems: Sequence[dict], prompt_ids: Sequence[Sequence[int]],
               empty_token: int) -> dict:
    """The probe of the module docstring over `problems` (each with "probe"), whose prompts as the policy sees
    them are `prompt_ids`. The model's train/eval mode is restored."""
    was_training = model.training
    model.eval()
    try:
        right = [tokenizer(p["probe"]["right"], add_special_tokens=False)["input_ids"] for p in problems]
        wrong = [tokenizer(p["probe"]["wrong"], add_special_tokens=False)["input_ids"] for p in problems]
        n, report = len(problems), {"n": len(problems)}
        for view, ctx in (("cond", [list(x) for x in prompt_ids]), ("free", [[empty_token]] * len(problems))):
            lp = _sequence_logps(model, ctx + ctx, right + wrong)
            r, w = lp[:n], lp[n:]
            report[view] = {"prefers_right": sum(a > b for a, b in zip(r, w)) / n,
                            "logp_right": sum(r) / n, "logp_wrong": sum(w) / n}
        return report
    finally:
        model.train(was_training)
