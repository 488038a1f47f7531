"""Naive full-logits reference: the single oracle for tests and benchmarks.

It materialises the (rows x vocab) logits, so it is only for small shapes, for checking, and as the
"naive" baseline in benchmarks. Pass float64 tensors to get the float64 oracle.
"""
from __future__ import annotations

import torch


def naive_token_logprobs(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                         temperature: float = 1.0, with_entropy: bool = False):
    """Returns (logp, entropy or None, lse) for every row, computed in the dtype of the inputs.

    logits = hidden @ weight.T / temperature; logp = logits[target] - logsumexp(logits);
    entropy = -sum softmax(logits) * log_softmax(logits).
    """
    logits = (hidden @ weight.t()) / temperature
    logits_acc = logits if logits.dtype == torch.float64 else logits.float()
    lse = torch.logsumexp(logits_acc, dim=-1)
    logp = logits_acc.gather(-1, targets.view(-1, 1)).squeeze(-1) - lse
    entropy = None
    if with_entropy:
        logsm = logits_acc - lse.unsqueeze(-1)
        entropy = -(logsm.exp() * logsm).sum(-1)
    return logp, entropy, lse
