"""AdamW with its state on the CPU (`optim.offload_optimizer_state = true`).

How: the optimizer's parameters are CPU copies of the model's (same dtype); `step()` copies the model's
current weights and gradients to them, runs torch's AdamW on the CPU, and copies the updated weights back.
The two moments (2 x the parameter bytes) and the step counters live only in CPU memory, so the GPU holds
weights + gradients + activations; the price is two host<->device copies of the weights and one of the
gradients per optimizer step, and the AdamW arithmetic on the CPU. The update is the same AdamW update
(same dtype, same hyperparameters), bit-identical to the resident optimizer when both run on the CPU.

The weights are copied to the CPU at every step (not only once), so anything that changes the model's
weights between steps (loading a checkpoint on resume) is picked up. `zero_grad` clears the model's gradients
too; `state_dict`/`load_state_dict` and LR schedulers work as on torch.optim.AdamW (it is one).
"""
from __future__ import annotations

from collections.abc import Iterable

import torch


class CPUOffloadAdamW(torch.optim.AdamW):
    def __init__(self, params: Iterable[torch.nn.Parameter], **kwargs):
        self.model_params: list[torch.nn.Parameter] = [p for p in params]
        cpu = [torch.nn.Parameter(p.detach().to("cpu", copy=True), requires_grad=p.requires_grad)
               for p in self.model_params]
        pin = torch.cuda.is_available() and any(p.is_cuda for p in self.model_params)
        if pin:
            cpu = [torch.nn.Parameter(c.data.pin_memory(), requires_grad=c.requires_grad) for c in cpu]
        kwargs.setdefault("foreach", False)   # the per-tensor CPU loop: no second full-size temporary
        super().__init__(cpu, **kwargs)
        self.cpu_params = cpu

    @torch.no_grad()
    def step(self, closure=None):
        if closure is not None:
            raise ValueError("CPUOffloadAdamW.step does not take a closure")
        for mp, cp in zip(self.model_params, self.cpu_params):
            cp.data.copy_(mp.detach(), non_blocking=True)
            if mp.grad is None:
                cp.grad = None
            else:
                if cp.grad is None:
                    cp.grad = torch.empty_like(cp.data)
                    if cp.data.is_pinned():
                        cp.grad = cp.grad.pin_memory()
                cp.grad.copy_(mp.grad, non_blocking=True)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        super().step()
        for mp, cp in zip(self.model_params, self.cpu_params):
            if cp.grad is not None:
                mp.data.copy_(cp.data, non_blocking=True)
        if torch.cuda.is_available():
            torch.cuda.synchronize()

    def zero_grad(self, set_to_none: bool = True):
        super().zero_grad(set_to_none=set_to_none)
        for mp in self.model_params:
            if set_to_none:
                mp.grad = None
            elif mp.grad is not None:
                mp.grad.zero_()


def optimizer_step(optimizer, scheduler, model, has_rows: bool, step_on_zero_grad: bool) -> bool:
    """The update after a step's backward. A step whose loss used no rows anywhere (an NSR or PSR phase without
    such samples) left no gradient: with `step_on_zero_grad` (optim.step_on_zero_grad, the default) AdamW still
    steps, on an all-zero gradient, as the paper's code does (its warm-up loss is a product with the masks, so its
    gradient is zero, not absent): m <- beta1 m, v <- beta2 v, the step count advances, and the bias-corrected
    momentum and the weight decay still move the weights. Without it such a step is skipped. Returns whether
    the optimizer stepped."""
    if not has_rows:
        if not step_on_zero_grad:
            return False
        for p in model.parameters():
            if p.requires_grad and p.grad is None:
                p.grad = torch.zeros_like(p)
    optimizer.step()
    scheduler.step()
    return True


def make_optimizer(model, o):
    """AdamW over the model's trainable parameters (o: OptimConfig; offloaded with offload_optimizer_state) and
    its LR scheduler (constant LR, as the paper; kept so that checkpoints carry one)."""
    cls = CPUOffloadAdamW if o.offload_optimizer_state else torch.optim.AdamW
    opt = cls([p for p in model.parameters() if p.requires_grad], lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps,
              weight_decay=o.weight_decay)
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)
