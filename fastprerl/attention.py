"""Per-sequence causal attention for packed bins, for models without flash-attn.

A packed bin holds many sequences. transformers' SDPA path turns the restarting position ids into one
dense (bin x bin) block-diagonal mask and attends over the whole bin: the cost grows with bin² and
most of it is masked out. `VARLEN_SDPA` is an attention implementation registered with transformers
that, when the packed forward passes the sequence boundaries (`seq_bounds`), runs causal SDPA on every
sequence alone (cost: the sum of the sequence lengths squared) and otherwise is exactly SDPA (same
function, same masks), so generation and ordinary forwards are unchanged.

`use_varlen_attention(model)` switches a model from "sdpa" to it when that is exact for the model (no
sliding window, no logit soft-capping); flash-attn models keep flash-attn's own varlen kernel.
"""
from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
import torch.nn.functional as F

log = logging.getLogger("fastprerl")

VARLEN_SDPA = "fastprerl_varlen_sdpa"
FLASH = ("flash_attention_2", "flash_attention_3")
_registered = False


def _varlen_sdpa_forward(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None,
                         seq_bounds: Sequence[int] = None, **kwargs):
    from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward

    if seq_bounds is None or query.shape[0] != 1:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, **kwargs)
    groups = getattr(module, "num_key_value_groups", 1)
    if groups > 1:
        key, value = repeat_kv(key, groups), repeat_kv(value, groups)
    p = dropout if module.training else 0.0
    outs = [F.scaled_dot_product_attention(query[:, :, s:e], key[:, :, s:e], value[:, :, s:e],
                                           dropout_p=p, is_causal=True, scale=scaling)
            for s, e in zip(seq_bounds[:-1], seq_bounds[1:])]
    out = torch.cat(outs, dim=2) if len(outs) > 1 else outs[0]
    return out.transpose(1, 2).contiguous(), None


def _register() -> bool:
    global _registered
    if not _registered:
        try:
            from transformers import AttentionInterface
            from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
        except ImportError:  # an older transformers without the interfaces: keep plain SDPA
            return False
        AttentionInterface.register(VARLEN_SDPA, _varlen_sdpa_forward)
        AttentionMaskInterface.register(VARLEN_SDPA, sdpa_mask)
        _registered = True
    return True


def _varlen_is_exact(config) -> bool:
    if getattr(config, "use_sliding_window", False) and getattr(config, "sliding_window", None):
        return False
    if getattr(config, "sliding_window", None) and not hasattr(config, "use_sliding_window"):
        return False  # Mistral-style: a window applies whenever it is set
    for key in ("attn_logit_softcapping", "final_logit_softcapping"):
        if getattr(config, key, None):
            return False
    return True


def use_varlen_attention(model) -> str:
    """Switch an SDPA model to per-sequence SDPA for packed forwards (idempotent); returns the
    model's attention implementation afterwards."""
    impl = model.config._attn_implementation
    if impl != "sdpa" or not _varlen_is_exact(model.config) or not _register():
        return impl
    try:
        model.set_attn_implementation(VARLEN_SDPA)
    except (ValueError, AttributeError) as e:  # a model class that cannot switch keeps its SDPA
        log.info("packed attention stays dense-mask SDPA: %s", e)
    return model.config._attn_implementation


def packed_attention_kwargs(impl: str, seq_lens: Sequence[int], device) -> dict:
    """Keyword arguments of a packed bin's forward that let the attention skip the dense mask."""
    if impl not in (VARLEN_SDPA,) + FLASH:
        return {}
    bounds = [0]
    for n in seq_lens:
        bounds.append(bounds[-1] + int(n))
    if impl == VARLEN_SDPA:
        return {"seq_bounds": tuple(bounds)}
    cu = torch.tensor(bounds, dtype=torch.int32, device=device)
    longest = max(seq_lens)
    return {"cu_seq_lens_q": cu, "cu_seq_lens_k": cu, "max_length_q": longest, "max_length_k": longest}
