"""One training step of a config on fake tensors, followed by torch's memory tracker.

What runs (the trainer's step, trainer.Trainer.train_step, from the packed batch on):
  - the policy built from the config's architecture alone (arch.load_architecture; transformers'
    from_config under FakeTensorMode on fake CPU tensors: byte counts do not depend on the device), in
    model.dtype, with model.gradient_checkpointing and [model.lora] applied as models.load_model applies
    them (PEFT's own wrap, fastprerl.lora.wrap);
  - the KL reference model (algo.kl_coef > 0): a second copy, frozen, its log-probs of every bin without a
    graph (what BinPasses.logp computes);
  - the packed micro-batches of the config's largest shapes: `largest_batch` packs, with the trainer's own
    packing.pack, responses of rollout.max_new_tokens tokens after prompts of `prompt_tokens` tokens, in both
    views (prompt-conditioned [x; y] and prompt-free [e; y]), as many as fill optim.max_tokens_per_microbatch
    (at most the step's prompts_per_step x samples_per_prompt samples);
  - per bin, the trainer's micro-batch forward (passes.bin_hidden: the model body over the packed bin,
    per-sequence attention), the fused log-prob loss (kernels.token_loss with the policy-gradient loss of
    objectives.policy_loss, + objectives.k3_kl when the KL is on, per-token coefficients as StepLoss forms
    them), backward; gradients accumulate over the bins;
  - gradient clipping (torch.nn.utils.clip_grad_norm_) and the optimizer step of optim.make_optimizer
    (AdamW; on a CUDA run with torch's CUDA default, the foreach implementation).
The optimizer holds its state before the step (a first update with zero gradients creates it, as every step
after the first has it), so the peak is that of a steady-state step. With optim.offload_optimizer_state the
AdamW state lives on the host: the optimizer step is not run on the device and its bytes are reported as host
memory (the CPU copies of the trainable weights and gradients and the two moments, 4 x their bytes).
With world_size > 1: torch's fake process group, the trainer's FSDP2 sharding (distributed.shard_model: every
decoder layer and the root) and FSDPMemTracker; the numbers are one rank's.

Not run under fake tensors (they read values): StepLoss's integer diagnostics (clip counts), BinPasses'
`loss.item()`, the row selection by advantages (the plan packs every sample it counts).
"""
from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from ..models import DTYPES
from ..packing import active_bins, pack
from .tracker import WORKSPACE, make_tracker, peak_snapshot


@dataclass
class StepPlan:
    """Bytes of one rank at the training step's peak, by category, and what was run."""
    categories: dict[str, int]            # weights, gradients, optimizer, activations, fused op workspace
    peak: int                             # device bytes at the peak
    raw: dict[str, int]                   # the tracker's own categories at the peak
    host_bytes: int = 0                   # optimizer offload: host memory
    opt_state: int = 0                    # bytes of the optimizer's state between steps (on the device)
    bins: list = field(default_factory=list)   # [(tokens, rows, view)] per micro-batch
    params: int = 0
    trainable: int = 0
    seconds: float = 0.0
    notes: list = field(default_factory=list)


def default_prompt_tokens(cfg) -> int:
    """The prompt length a plan assumes: vllm_max_model_len - max_new_tokens when the config bounds the
    sequence (the longest prompt it admits), else 512 tokens."""
    r = cfg.rollout
    if r.vllm_max_model_len and r.vllm_max_model_len > r.max_new_tokens:
        return r.vllm_max_model_len - r.max_new_tokens
    return 512


def largest_batch(cfg, prompt_tokens: int, empty_token: int = 0):
    """The packed batch of the step's largest micro-batches (packing.pack): k_c prompt-conditioned sequences of
    prompt_tokens + max_new_tokens tokens and k_f prompt-free ones of 1 + max_new_tokens, each count as many as
    fill optim.max_tokens_per_microbatch (at least one), at most the step's samples."""
    R, M = cfg.rollout.max_new_tokens, cfg.optim.max_tokens_per_microbatch
    B = cfg.rollout.prompts_per_step * cfg.rollout.samples_per_prompt
    k_c = max(1, min(B, M // (prompt_tokens + R)))
    k_f = max(1, min(B, M // (1 + R)))
    n = max(k_c, k_f)
    prompts = [[empty_token + 1] * prompt_tokens] * n
    responses = [[empty_token + 2] * R] * n
    return pack(prompts, responses, cond=[i < k_c for i in range(n)], free=[i < k_f for i in range(n)],
                empty_token=empty_token, max_tokens=M)


def build_model(cfg, arch, *, attn_implementation: str | None = None):
    """The policy as models.load_model builds it, from `arch` (a PretrainedConfig), in the current
    (fake) tensor mode."""
    from transformers import AutoModelForCausalLM

    impl = attn_implementation or cfg.model.attn_implementation
    model = AutoModelForCausalLM.from_config(arch, dtype=DTYPES[cfg.model.dtype], attn_implementation=impl)
    if cfg.model.gradient_checkpointing:
        if hasattr(model, "activation_checkpointing_enable"):
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    if cfg.model.lora.r > 0:
        from unittest import mock

        from ..lora import wrap
        # PEFT moves each new adapter to its base layer's device with Module.to, which swaps fake parameters and
        # fails (a fake tensor carries a weakref); everything here is on one (fake CPU) device, and the adapters
        # are created in float32, as PEFT's autocast keeps them in a real run
        with mock.patch.object(torch.nn.Module, "to", lambda self, *a, **k: self):
            model = wrap(model, cfg.model.lora)
    model.train()
    return model


def _bytes(tensors) -> int:
    seen, total = set(), 0
    for t in tensors:
        t = getattr(t, "_local_tensor", t)
        st = t.untyped_storage()
        key = id(st) if not hasattr(st, "_cdata") else st._cdata
        if key not in seen:
            seen.add(key)
            total += st.nbytes()
    return total


class _Dist:
    """What distributed.shard_model reads of a distributed.Dist."""

    def __init__(self, world_size: int):
        self.world_size = world_size


def bin_index(batch):
    """(active bins, {bin: row indices}, {bin: rows relative to the bin's start}); on real tensors (they
    are data-dependent: compute them outside the fake mode)."""
    todo = active_bins(batch)
    idx = {b: batch.bin_row_index(b) for b in todo}
    return todo, idx, {b: batch.rows[idx[b]] - batch.bins[b][0] for b in todo}


def run_step(cfg, model, batch, *, tracker=None, root=None, ref_model=None, optimizer=None,
             foreach: bool | None = None, impl: str = "torch", progress: Callable[[str], None] = None,
             index=None):
    """One training step over `batch` (every bin), as the module docstring says; gradients accumulate over
    the bins; then clipping and the optimizer step (unless optimizer is None). tracker: a tracker of
    tracker.make_tracker whose workspace() marks the fused op (None: no marking)."""
    from ..kernels import token_logprobs_no_grad, token_loss
    from ..models import lm_head_weight
    from ..objectives import k3_kl, policy_loss
    from ..passes import bin_hidden

    ws = tracker.workspace if tracker is not None else contextlib.nullcontext
    algo, T = cfg.algo, cfg.rollout.temperature
    todo, idx, rel = index or bin_index(batch)
    on = (lambda fn: fn(model)) if root is None else root

    ref = {}
    if ref_model is not None:   # the reference model's log-probs of every bin, without a graph
        with torch.no_grad():
            for b in todo:
                if tracker is not None:
                    tracker.reset_mod_stats()
                hid = bin_hidden(ref_model, batch, b)
                h = hid.index_select(0, rel[b].to(hid.device))
                ref[b] = token_logprobs_no_grad(h, lm_head_weight(ref_model), batch.targets[idx[b]].to(h.device),
                                                temperature=T, impl=impl).logp

    for k, b in enumerate(todo):
        if progress:
            progress(f"micro-batch {k + 1}/{len(todo)}: {batch.bins[b][1] - batch.bins[b][0]} tokens, "
                     f"{idx[b].numel()} rows")
        def fn(m, b=b):
            hid = bin_hidden(m, batch, b)
            h = hid.index_select(0, rel[b].to(hid.device))
            targets = batch.targets[idx[b]].to(h.device)
            coef = torch.full((h.shape[0],), 1.0 / max(1, h.shape[0]), device=h.device)
            adv = torch.ones(h.shape[0], device=h.device)
            kl = ref.get(b)

            def loss_fn(lp, i):   # StepLoss's per-token arithmetic without its integer diagnostics
                out = coef[i] * policy_loss(lp, lp.detach(), adv[i], eps_low=algo.clip_eps_low,
                                            eps_high=algo.clip_eps_high, dual_clip_c=algo.dual_clip_c)
                if kl is not None:
                    out = out + coef[i] * k3_kl(lp, kl[i])
                return out

            ent = torch.empty(h.shape[0], device=h.device) if cfg.logging.entropy else None
            with ws():
                return token_loss(h, lm_head_weight(m), targets, loss_fn, temperature=T, impl=impl,
                                  entropy_out=ent)

        if tracker is not None:   # torch's trackers keep per-module stats of one call: one per micro-batch
            tracker.reset_mod_stats()
        loss = on(fn)
        loss.backward()
        del loss
    if optimizer is not None:
        clip = cfg.optim.grad_clip if cfg.optim.grad_clip > 0 else float("inf")
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], clip, foreach=foreach)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


def warm_optimizer(model, optimizer):
    """AdamW's state as every step after the first holds it: one update with zero gradients (lr unchanged;
    with zero gradients and moments AdamW changes the weights only by its weight decay)."""
    for p in model.parameters():
        if p.requires_grad:
            p.grad = torch.zeros_like(p)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def _group(raw: dict[str, int], fsdp: bool) -> dict[str, int]:
    g = lambda *names: sum(raw.get(n, 0) for n in names)  # noqa: E731
    if fsdp:
        return {"weights": g("Sharded Param", "Unsharded Param", "Buffer"),
                "gradients": g("Sharded Grad", "Unsharded Grad"),
                "optimizer": g("OptState"),
                "activations": g("Activation", "Temp", "All Gather", "Reduce Scatter", "Inputs"),
                "fused op workspace": g(WORKSPACE)}
    return {"weights": g("Parameter", "Buffer"), "gradients": g("Gradient"), "optimizer": g("Optstate"),
            "activations": g("Activation", "Temp", "Other"), "fused op workspace": g(WORKSPACE)}


def plan_step(cfg, arch, *, prompt_tokens: int, world_size: int = 1, device: str = "cuda",
              progress: Callable[[str], None] = None) -> StepPlan:
    """The training step's peak on fake tensors (module docstring). device: the device the config runs on
    ("cuda": the optimizer takes torch's CUDA default, foreach; "cpu": the single-tensor loop)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from ..optim import make_optimizer

    say = progress or (lambda s: None)
    t0 = time.perf_counter()
    notes = []
    attn = cfg.model.attn_implementation
    if attn.startswith("flash_attention"):
        notes.append(f"model.attn_implementation = {attn!r} simulated with per-sequence SDPA (the same varlen "
                     f"attention, no dense mask; flash-attn's kernel is not run on fake tensors)")
        attn = "sdpa"
    impl = "torch"
    if cfg.model.logprob_impl in ("triton", "auto") and device == "cuda":
        notes.append("fused log-prob op: the torch path's allocations (tiles of <= 2 MiB, the hidden-state and "
                     "LM-head gradients it forms in the forward) stand for the Triton path's")
    batch = largest_batch(cfg, prompt_tokens)
    index = bin_index(batch)
    offload = cfg.optim.offload_optimizer_state
    fsdp = world_size > 1
    pg_started = False
    try:
        with FakeTensorMode(allow_non_fake_inputs=True):
            say(f"building {type(arch).__name__.replace('Config', '')} on fake tensors")
            model = build_model(cfg, arch, attn_implementation=attn)
            n_params = sum(p.numel() for p in model.parameters())
            n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
            ref_model = None
            if cfg.algo.kl_coef > 0:
                ref_model = build_model(cfg, arch, attn_implementation=attn).eval().requires_grad_(False)
            root = None
            if fsdp:
                import torch.distributed as dist
                from torch.testing._internal.distributed.fake_pg import FakeStore

                from ..distributed import shard_model
                if not dist.is_initialized():
                    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=world_size)
                    pg_started = True
                say(f"sharding with FSDP2 over {world_size} ranks (fake process group)")
                shard = dict(d=_Dist(world_size), dtype=DTYPES[cfg.model.dtype], cpu_offload=cfg.dist.cpu_offload)
                from unittest import mock

                import torch.distributed.device_mesh as dm
                from torch._subclasses.fake_tensor import unset_fake_temporarily
                real_mesh = dm.init_device_mesh

                def mesh(*a, **k):   # the mesh holds rank ids as a real tensor (read with tolist)
                    with unset_fake_temporarily():
                        return real_mesh(*a, **k)
                with mock.patch.object(dm, "init_device_mesh", mesh):
                    root = shard_model(model, **shard)
                    ref_root = shard_model(ref_model, **shard) if ref_model is not None else None
                if ref_model is not None:
                    notes.append("the KL reference model is sharded like the policy")
                    del ref_root
            optimizer = None
            foreach = True if device == "cuda" else None
            trainable_bytes = _bytes(p for p in model.parameters() if p.requires_grad)
            host = opt_state = 0
            if not offload:
                optimizer, _ = make_optimizer(model, cfg.optim)
                if foreach:
                    for g in optimizer.param_groups:
                        g["foreach"] = True
                warm_optimizer(model, optimizer)
                opt_state = _bytes(t for st in optimizer.state.values() for t in st.values() if torch.is_tensor(t))
            else:
                host = 4 * trainable_bytes
                notes.append("optim.offload_optimizer_state: AdamW runs on the host (4 x the trainable bytes "
                             "there); the device holds no optimizer state")
            if fsdp and cfg.dist.cpu_offload:
                notes.append("dist.cpu_offload: FSDP2 keeps the sharded parameters, gradients and AdamW state on "
                             "the host; the device holds the unsharded layers in flight")
            tracker = make_tracker(root, optimizer)
            if root is None:
                tracker.track_external(model, *( [ref_model] if ref_model is not None else []),
                                       *([optimizer] if optimizer is not None else []))
            say(f"running one training step ({len(index[0])} micro-batches)")
            with tracker:
                run_step(cfg, model, batch, tracker=tracker, root=root, ref_model=ref_model,
                         optimizer=optimizer, foreach=foreach, impl=impl, progress=say, index=index)
            raw = peak_snapshot(tracker)
    finally:
        if pg_started:
            import torch.distributed as dist
            dist.destroy_process_group()
    cats = _group(raw, fsdp)
    if fsdp and cfg.dist.cpu_offload:   # sharded state lives on the host
        host += raw.get("Sharded Param", 0) + raw.get("Sharded Grad", 0) + raw.get("OptState", 0)
        cats["weights"] -= raw.get("Sharded Param", 0)
        cats["gradients"] -= raw.get("Sharded Grad", 0)
        cats["optimizer"] = 0
    bins = [(e - s, int(batch.bin_row_index(b).numel()),
             "cond" if bool((batch.row_view[batch.bin_row_index(b)] == 0).all()) else
             ("free" if bool((batch.row_view[batch.bin_row_index(b)] == 1).all()) else "both"))
            for b, (s, e) in enumerate(batch.bins)]
    if fsdp and cfg.dist.cpu_offload:
        opt_state = 0
    return StepPlan(categories=cats, peak=sum(cats.values()), raw=raw, host_bytes=host, opt_state=opt_state, bins=bins,
                    params=n_params, trainable=n_train, seconds=time.perf_counter() - t0, notes=notes)
