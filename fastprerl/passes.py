"""The micro-batch passes of a training step over the packed bins (packing.active_bins): the policy's forward +
fused log-prob loss + backward, and the KL reference model's log-probs without a graph.

In a plain process a pass calls fn(model) directly. Under torchrun it runs inside the model's FSDP2 root
(distributed.LossRoot: the weights are gathered for the call), and every process runs as many passes as the
busiest one (dist.max_int): a process with fewer bins runs one-token passes instead, whose loss is 0 x its
log-prob, so they add exactly 0 to every gradient and let that process take part in the same collectives.
"""
from __future__ import annotations

import torch

from .kernels import token_logprobs_no_grad, token_loss
from .models import lm_head_weight
from .objectives import LossDiagnostics, StepLoss
from .packing import active_bins, bin_rows, pack


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

    def backward(self, batch, loss_fn: StepLoss, entropy: bool
                 ) -> tuple[float, LossDiagnostics, torch.Tensor | None]:
        """Forward + fused loss + backward, bin by bin; gradients accumulate in the model. Returns the summed
        loss, the step's LossDiagnostics and the per-row entropy (R,) (None unless `entropy`)."""
        ent_rows = torch.zeros(batch.rows.numel()) if entropy else None
        total, parts = 0.0, []

        def on_rows(ridx):   # token_loss calls this per chunk of the bin's rows; i indexes into ridx
            def fn(lp, i):
                loss, diag = loss_fn(lp, ridx[i.cpu()])
                parts.append(diag)
                return loss
            return fn

        def bin_loss(b):   # fn(model) -> the loss of bin b and its entropy buffer
            def fn(model):
                ridx, h, targets = bin_rows(model, batch, b)
                ent = torch.empty(ridx.numel(), device=h.device) if ent_rows is not None else None
                loss = token_loss(h, lm_head_weight(model), targets, on_rows(ridx),
                                  temperature=self.temperature, impl=self.impl, entropy_out=ent)
                return ridx, loss, ent
            return fn

        def idle(model):   # one token, loss 0 x its log-prob
            _, h, targets = bin_rows(model, self._one_token_batch(), 0)
            return token_loss(h, lm_head_weight(model), targets, lambda lp, i: lp * 0.0,
                              temperature=self.temperature, impl=self.impl)

        self.model.train()
        todo = active_bins(batch)
        for k in range(self.dist.max_int(len(todo))):   # as many passes as the busiest process
            if k >= len(todo):
                self._on_model(idle).backward()
                continue
            ridx, loss, ent = self._on_model(bin_loss(todo[k]))
            loss.backward()
            total += loss.item()
            if ent_rows is not None:   # from the loss's own vocabulary sweep: no second pass over the LM head
                ent_rows[ridx] = ent.cpu()
        return total, LossDiagnostics.merge(parts, loss_fn.names), ent_rows

    @torch.no_grad()
    def logp(self, batch) -> torch.Tensor:
        """(R,) the model's log-probs of the packed rows, bin by bin, in one call of the root under torchrun
        (one-token forwards where a process has fewer bins); the root's weights are resharded after."""
        out, todo = torch.zeros(batch.rows.numel()), active_bins(batch)
        passes = self.dist.max_int(len(todo))   # len(todo) in a plain process

        def all_bins(model):
            W = lm_head_weight(model)
            for k in range(passes):
                if k >= len(todo):
                    bin_rows(model, self._one_token_batch(), 0)
                    continue
                ridx, h, targets = bin_rows(model, batch, todo[k])
                out[ridx] = token_logprobs_no_grad(h, W, targets, temperature=self.temperature,
                                                   impl=self.impl).logp.cpu()
        self._on_model(all_bins)
        if self.root is not None:
            self.root.reshard()   # the root keeps its weights gathered after a forward
        return out
