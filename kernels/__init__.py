"""fastprerl.kernels: fused per-token log-probs from hidden states and the LM-head weight.

A library on its own: imports nothing of fastprerl but its own modules.
"""
from .api import IMPLS, TokenLogprobs, resolve_impl, token_logprobs, token_logprobs_no_grad, token_loss
from .reference import naive_token_logprobs

__all__ = ["IMPLS", "TokenLogprobs", "resolve_impl", "token_logprobs", "token_logprobs_no_grad",
           "token_loss", "naive_token_logprobs"]
