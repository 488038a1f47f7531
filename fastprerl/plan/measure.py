"""The reality a plan is checked against: the peak of one real CPU training step of the same config and shapes.

What runs: the trainer's own objects on real tensors: models.load_model (the real weights, or the builtin
random-init ones), the trainer's micro-batch passes (passes.BinPasses.backward: packed forward per bin, the
fused log-prob loss, backward), the step loss (objectives.StepLoss built from SampleTerms of both views), the
reference model's log-probs (BinPasses.logp) when algo.kl_coef > 0, gradient clipping and
optim.make_optimizer's AdamW, on the packed batch the plan uses (step.largest_batch). The optimizer holds its
state before the step (one zero-gradient update, as in the plan: every step after the first has it).

How it is measured: `LiveBytes`, a TorchDispatchMode that adds the bytes of every tensor storage an operator
returns and subtracts them when the storage is freed (a weakref finalizer), on top of the bytes of the weights,
buffers and optimizer state that exist before the step. That is torch's own view of live tensor memory, what
torch.cuda.memory_allocated reports on a GPU (the quantity a plan predicts and a "fits in N GiB" depends on).
Not RSS: on the CPU, glibc's arenas keep freed blocks and the BLAS/OpenMP runtimes hold their own buffers, so
the resident set above a baseline mixes allocator behaviour and library workspaces into the number, and its
peak (ru_maxrss) can only be read once per process. This counter is independent of torch's MemTracker that the
plan uses (no module hooks, no categories): it only sees storages come and go.
"""
from __future__ import annotations

import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_map_only


class LiveBytes(TorchDispatchMode):
    """Bytes of live tensor storages created by operators while active; `peak` is the highest value.
    existing: tensors that hold memory already (weights, optimizer state): an in-place operator returns their
    storage, which is not a new allocation."""

    def __init__(self, existing=()):
        super().__init__()
        self.live = 0
        self.peak = 0
        self._seen = {}
        self._old = {t.untyped_storage().data_ptr() for t in existing}

    def _free(self, key, n):
        if self._seen.pop(key, None) is not None:
            self.live -= n

    def _add(self, t):
        st = t.untyped_storage()
        n = st.nbytes()
        key = st.data_ptr()
        if n == 0 or key in self._seen or key in self._old:
            return
        self._seen[key] = weakref.finalize(st, self._free, key, n)
        self.live += n
        self.peak = max(self.peak, self.live)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        tree_map_only(torch.Tensor, self._add, out)
        return out


def _storage_bytes(tensors) -> int:
    seen, total = set(), 0
    for t in tensors:
        st = t.untyped_storage()
        if st.data_ptr() not in seen:
            seen.add(st.data_ptr())
            total += st.nbytes()
    return total


def measure_real_step(cfg, *, prompt_tokens: int) -> dict:
    """{"peak": bytes, "before": bytes of weights + buffers + optimizer state, "step": peak bytes the step added}
    of one real CPU training step (module docstring)."""
    import copy

    from ..distributed import Dist
    from ..models import load_model
    from ..objectives import SampleTerms, StepLoss
    from ..optim import make_optimizer
    from ..passes import BinPasses
    from .step import largest_batch, warm_optimizer

    torch.manual_seed(cfg.run.seed)
    model = load_model(cfg.model.path, dtype=cfg.model.dtype, attn_implementation=cfg.model.attn_implementation,
                       seed=cfg.run.seed, gradient_checkpointing=cfg.model.gradient_checkpointing, lora=cfg.model.lora)
    ref = copy.deepcopy(model).eval().requires_grad_(False) if cfg.algo.kl_coef > 0 else None
    batch = largest_batch(cfg, prompt_tokens)
    impl = "torch" if cfg.model.logprob_impl in ("auto", "triton") else cfg.model.logprob_impl
    kw = dict(dist=Dist(), empty_token=0, temperature=cfg.rollout.temperature, impl=impl)
    passes = BinPasses(model, None, **kw)
    n = batch.num_samples
    adv = torch.linspace(-1.0, 1.0, n)   # mixed signs, as a step with right and wrong answers
    every = torch.ones(n, dtype=torch.bool)
    terms = {"grpo": SampleTerms(adv, every, "cond"), "nsr_prerl": SampleTerms(adv.clamp(max=0) - 0.1, every, "free")}
    resp_lens = torch.full((n,), cfg.rollout.max_new_tokens, dtype=torch.long)
    optimizer, _ = make_optimizer(model, cfg.optim)
    warm_optimizer(model, optimizer)
    state = [t for s in optimizer.state.values() for t in s.values() if torch.is_tensor(t)]
    if cfg.optim.offload_optimizer_state:
        state = []   # host memory, as in the plan
    models = [model] + ([ref] if ref is not None else [])
    existing = [t for m in models for t in list(m.parameters()) + list(m.buffers())] + state
    before = _storage_bytes(existing)
    meter = LiveBytes(existing + [t for s in optimizer.state.values() for t in s.values() if torch.is_tensor(t)])
    with meter:
        ref_logp = BinPasses(ref, None, **kw).logp(batch) if ref is not None else None
        loss_fn = StepLoss.build(terms, {"grpo": 1.0, "nsr_prerl": 1.0}, resp_lens, row_sample=batch.row_sample,
                                 cond=batch.view_mask("cond"), behaviour=torch.zeros(batch.rows.numel()),
                                 algo=cfg.algo, ref=ref_logp)
        passes.backward(batch, loss_fn, entropy=cfg.logging.entropy)
        clip = cfg.optim.grad_clip if cfg.optim.grad_clip > 0 else float("inf")
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], clip)
        if not cfg.optim.offload_optimizer_state:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return {"peak": before + meter.peak, "before": before, "step": meter.peak}
