"""The model's forwards over the packed bins (packing.py builds the stream and its indices, this module runs the
model on them) and the micro-batch passes of a training step: the policy's forward + fused log-prob loss +
backward, and the KL reference model's log-probs without a graph.

`bin_hidden` is one forward of the model body over one bin, `bin_rows` picks the hidden states of the bin's
response rows, and `bins` is the loop over the bins that hold rows: the training pass, the reference model's
pass and `fastprerl align` all take their hidden states from these.

In a plain process a pass calls fn(model) directly. Under torchrun it runs inside the model's FSDP2 root
(distributed.LossRoot: the weights are gathered for the call), and every process runs as many passes as the
busiest one (dist.max_int): a process with fewer bins runs one-token passes instead, whose loss is 0 x its
log-prob, so they add exactly 0 to every gradient and let that process take part in the same collectives.
"""
from __future__ import annotations

from collections.abc import Iterator
from functools import partial
from typing import NamedTuple

import torch

from .attention import packed_attention_kwargs, use_varlen_attention
from .kernels import token_logprobs_no_grad, token_loss
from .models import decoder_of, lm_head_weight
from .objectives import LossDiagnostics, StepLoss
from .packing import PackedBatch, active_bins, pack


def bin_hidden(model, batch: PackedBatch, b: int, per_sequence_attention: bool = True) -> torch.Tensor:
    """Final hidden states (L_b, H) of bin b: one forward of the model body, no LM head.

    Attention is causal within each packed sequence: flash-attn varlen when the model uses
    flash_attention_2, per-sequence SDPA for SDPA models (see attention.py; the model is switched to
    it on first use), otherwise (eager, sliding windows) a block-diagonal mask over this bin only,
    derived by transformers from the restarting position ids. per_sequence_attention=False keeps an
    SDPA model on that dense-mask path (for comparisons)."""
    s, e = batch.bins[b]
    dev = next(model.parameters()).device
    ids = batch.input_ids[s:e].to(dev).unsqueeze(0)
    pos = batch.position_ids[s:e].to(dev).unsqueeze(0)
    impl = use_varlen_attention(model) if per_sequence_attention else model.config._attn_implementation
    out = decoder_of(model)(input_ids=ids, position_ids=pos, use_cache=False,
                            **packed_attention_kwargs(impl, batch.bin_seq_lens(b), dev))
    return out.last_hidden_state[0]


def packed_hidden(model, batch: PackedBatch, per_sequence_attention: bool = True) -> torch.Tensor:
    """Hidden states (T, H) of the whole stream, bin by bin (see `bin_hidden`)."""
    if not batch.bins:
        p = next(model.parameters())
        return p.new_zeros(0, model.config.hidden_size)
    return torch.cat([bin_hidden(model, batch, b, per_sequence_attention) for b in range(len(batch.bins))],
                     dim=0)


class BinRows(NamedTuple):
    """The rows of one bin: ridx (r,) indices into the R packed rows, hidden (r, H) their final hidden states
    (on the model's device), targets (r,) their tokens (same device)."""
    ridx: torch.Tensor
    hidden: torch.Tensor
    targets: torch.Tensor


def bin_rows(model, batch: PackedBatch, b: int) -> BinRows:
    """The rows of bin b with their final hidden states: one forward of the model body (`bin_hidden`)."""
    ridx = batch.bin_row_index(b)
    hid = bin_hidden(model, batch, b)
    h = hid.index_select(0, (batch.rows[ridx] - batch.bins[b][0]).to(hid.device))
    return BinRows(ridx, h, batch.targets[ridx].to(hid.device))


def bins(model, batch: PackedBatch) -> Iterator[BinRows]:
    """One forward of the model body per bin that holds response rows (`bin_hidden`), in stream order.
    Gradients flow when the caller's grad mode allows them."""
    for b in active_bins(batch):
        yield bin_rows(model, batch, b)


class RowLoss:
    """The per-chunk loss token_loss calls for the rows of one bin: loss_fn on the chunk's rows (i indexes into
    ridx, the bin's rows among the R packed rows). Keeps the LossDiagnostics of every call, in call order, in
    `parts`."""

    def __init__(self, loss_fn: StepLoss, ridx: torch.Tensor):
        self.loss_fn, self.ridx = loss_fn, ridx
        self.parts: list[LossDiagnostics] = []

    def __call__(self, lp: torch.Tensor, i: torch.Tensor) -> torch.Tensor:
        loss, diag = self.loss_fn(lp, self.ridx[i.cpu()])
        self.parts.append(diag)
        return loss


def zero_loss(lp: torch.Tensor, i: torch.Tensor) -> torch.Tensor:
    """The loss of an idle pass's token: 0 x its log-prob (exactly 0 in every gradient)."""
    return lp * 0.0


class BinPasses:
    """The passes of one model (the policy or the reference). root: its FSDP2 root under torchrun, else None."""

    def __init__(self, model, root, dist, *, empty_token: int, temperature: float, impl: str):
        self.model, self.root, self.dist = model, root, dist
        self.empty_token, self.temperature, self.impl = empty_token, temperature, impl

    def _on_model(self, fn):
        """fn(model): inside the FSDP2 root's forward under torchrun, else called directly."""
        return fn(self.model) if self.root is None else self.root(fn)

    def _one_token_batch(self):
        e = self.empty_token
        return pack([[e]], [[e]], cond=[True], empty_token=e, max_tokens=2)

    def _token_loss(self, model, rows: BinRows, loss_fn, entropy_out=None) -> torch.Tensor:
        return token_loss(rows.hidden, lm_head_weight(model), rows.targets, loss_fn,
                          temperature=self.temperature, impl=self.impl, entropy_out=entropy_out)

    def _idle_loss(self, model) -> torch.Tensor:
        """One token of the one-token batch, loss 0 x its log-prob."""
        return self._token_loss(model, bin_rows(model, self._one_token_batch(), 0), zero_loss)

    def _bin_loss(self, model, batch: PackedBatch, b: int, loss_fn: StepLoss, entropy: bool
                  ) -> tuple[torch.Tensor, RowLoss, torch.Tensor | None]:
        """Bin b's forward and fused loss: (the loss, its RowLoss with the diagnostics of the calls so far,
        the rows' entropy (r,) on the model's device, None unless `entropy`)."""
        rows = bin_rows(model, batch, b)
        row_loss = RowLoss(loss_fn, rows.ridx)
        ent = torch.empty(rows.ridx.numel(), device=rows.hidden.device) if entropy else None
        return self._token_loss(model, rows, row_loss, entropy_out=ent), row_loss, ent

    def backward(self, batch, loss_fn: StepLoss, entropy: bool
                 ) -> tuple[float, LossDiagnostics, torch.Tensor | None]:
        """Forward + fused loss + backward, bin by bin; gradients accumulate in the model. Returns the summed
        loss, the step's LossDiagnostics and the per-row entropy (R,) (None unless `entropy`)."""
        ent_rows = torch.zeros(batch.rows.numel()) if entropy else None
        total, parts = 0.0, []
        self.model.train()
        todo = active_bins(batch)
        for k in range(self.dist.max_int(len(todo))):   # as many passes as the busiest process
            if k >= len(todo):
                self._on_model(self._idle_loss).backward()
                continue
            loss, row_loss, ent = self._on_model(partial(self._bin_loss, batch=batch, b=todo[k], loss_fn=loss_fn,
                                                         entropy=entropy))
            loss.backward()
            total += loss.item()
            parts += row_loss.parts   # read after backward: every call of this bin's loss
            if ent_rows is not None:   # from the loss's own vocabulary sweep: no second pass over the LM head
                ent_rows[row_loss.ridx] = ent.cpu()
        return total, LossDiagnostics.merge(parts, loss_fn.names), ent_rows

    @torch.no_grad()
    def logp(self, batch) -> torch.Tensor:
        """(R,) the model's log-probs of the packed rows, bin by bin, in one call of the root under torchrun
        (one-token forwards where a process has fewer bins); the root's weights are resharded after."""
        todo = active_bins(batch)
        passes = self.dist.max_int(len(todo))   # len(todo) in a plain process
        out = self._on_model(partial(self._all_logp, batch=batch, todo=todo, passes=passes))
        if self.root is not None:
            self.root.reshard()   # the root keeps its weights gathered after a forward
        return out

    def _all_logp(self, model, batch: PackedBatch, todo: list[int], passes: int) -> torch.Tensor:
        """Every pass of `logp` in one call: (R,) the log-probs of the rows of the bins todo, a one-token forward
        for each pass k past the end of todo."""
        out, W = torch.zeros(batch.rows.numel()), lm_head_weight(model)
        for k in range(passes):
            if k >= len(todo):
                bin_rows(model, self._one_token_batch(), 0)
                continue
            ridx, h, targets = bin_rows(model, batch, todo[k])
            out[ridx] = token_logprobs_no_grad(h, W, targets, temperature=self.temperature,
                                               impl=self.impl).logp.cpu()
        return out
