"""Several processes under torchrun: the process group, rank helpers, FSDP2 sharding and the few collectives
the trainer needs. Only torch.distributed is used (no communication layer of our own).

A run is distributed when torchrun's environment is set (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT;
`torchrun --nproc_per_node=N -m fastprerl train CONFIG`), also with one process. A plain process (no such
environment) is not: it trains in one process, without a process group, FSDP or DCP.

- Backend: nccl when the run is on CUDA (each rank takes the GPU LOCAL_RANK), gloo on the CPU. Every
  collective has the timeout `dist.timeout_s`: a rank that died or hangs makes the others fail with
  CollectiveTimeout (its message names the key) instead of waiting for ever.
- Work split: the config's batch numbers are global. Every rank draws the step's whole batch of prompts from
  the same stream (so the data position is a function of the global step) and keeps its slice of
  prompts_per_step / world_size prompts (`shard`).
- Sampling RNG: a distributed run re-seeds torch, python and numpy at every step from (run.seed, step, rank)
  (`step_seed`), so what a step samples does not depend on how the run got there: a resume at the same or at
  another world size is well defined without carrying per-rank RNG states.
- FSDP2 (`shard_model`): fully_shard over every decoder layer, then over a thin root module (`LossRoot`)
  that holds the Hugging Face model. The trainer runs the hidden-state forward AND the fused log-prob op
  inside LossRoot.forward, so FSDP2 all-gathers the LM-head weight (with the embeddings and final norm, the
  root's parameters) for the call and reduce-scatters its gradient in backward, like any other weight. The
  head is not kept replicated: that would need a second gradient all-reduce of our own for the head (and the
  tied embedding) and its full optimizer state on every rank.
- Gradients: the step loss of each rank is already divided by the step's GLOBAL token counts (all-reduced,
  `all_reduce_counts`), so the gradient of the whole step is the SUM of the ranks' gradients. FSDP2 averages
  by default (divides by the world size); `shard_model` sets the gradient divide factor to 1 on every FSDP
  module (and plain SUM collectives: gloo has no PREMUL_SUM), so the reduce-scatter sums. (Scaling the loss by the world size instead would round differently
  than a plain process for world sizes that are not powers of two.)
- Mixed precision: MixedPrecisionPolicy(param_dtype = model.dtype, reduce_dtype = float32): gradients are
  summed over ranks in fp32 also for bf16/fp16 models.
- CPU offload, two ways, both kept: `optim.offload_optimizer_state` (plain process, fastprerl/optim.py)
  moves only AdamW's two moments to the CPU (weights and gradients stay on the device; per step one copy of
  weights and gradients to the host and of the weights back), is bit-identical to the resident AdamW and
  needs no process group. `dist.cpu_offload` (FSDP2's CPUOffloadPolicy, under torchrun, also with
  --nproc_per_node=1) keeps the sharded weights, the gradients and the moments on the CPU and runs AdamW
  there; the device holds only the layers being computed (gathered per layer, forward and backward) and the
  activations. The first costs less per step when weights + gradients fit on the device; the second is the
  way when they do not. Under torchrun optim.offload_optimizer_state is refused (it would copy DTensor shards
  by hand beside FSDP2's own offload).
- Generation (`full_weights`): the HF backend's generate() runs on full weights, gathered once for the whole
  call (every FSDP module unsharded, reshard-after-forward off) and resharded after it, not once per token.
  The vLLM backend's engine (one per rank) holds its own copy: nothing is gathered around its generate();
  after every step the shards are gathered one tensor at a time (`full_tensor`) into it (rollout/vllm.py).
- LoRA (model.lora.r > 0): fully_shard over the PEFT model's decoder layers and the root as above, so the
  frozen base weights and the trainable adapters of a layer share one FSDP module. FSDP2 all-gathers both
  and reduce-scatters only the parameters that got a gradient (the adapters); the optimizer holds only the
  adapters, so only they have AdamW state. The LM head is frozen: its gathered parameter keeps
  requires_grad False, so the fused op takes its frozen-head path (no dW). DCP checkpoints hold the adapter
  only (state/dcp.py); final/ is written from a plain copy exactly as a plain LoRA run writes it.
- KL reference model (algo.kl_coef > 0): copied from the policy before sharding (as a plain process copies
  it) and sharded like it under its own FSDP2 root, never given a gradient. Its log-probs are computed inside
  that root's forward with as many forwards as the busiest process (one-token forwards fill in), like the
  training passes. It is saved in the DCP checkpoint ("ref"), so a resume after a re-sync at a phase switch
  is exact; the re-sync itself is load_state_dict of the policy's shards (same mesh and placements: a local
  copy on every rank).
- Periodic evaluation (eval.every > 0): every rank gathers the full weights (full_weights) and rank 0
  evaluates them alone, with the code and the sampling RNG of one process, so its numbers are exactly those
  one process gets for these weights; splitting the problems over ranks would change which random numbers
  each sample draws. The other ranks wait for rank 0's result (within dist.timeout_s: an evaluation that
  takes longer needs a larger timeout). Rank 0 writes eval.jsonl.
"""
from __future__ import annotations

import contextlib
import datetime
import hashlib
import os
from dataclasses import dataclass

import torch
import torch.distributed as tdist

from .models import decoder_of

TORCHRUN_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


class CollectiveTimeout(RuntimeError):
    """A collective did not finish within dist.timeout_s (another rank died, hangs or stopped early)."""


@dataclass(frozen=True)
class Dist:
    """Where this process stands: rank, world size, local rank; enabled = under torchrun."""
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    enabled: bool = False
    timeout_s: float = 0.0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    # -------------------------------------------------------------------------------------- collectives
    def _guard(self):
        return _timeout_named(self.timeout_s)

    def all_reduce_counts(self, counts: dict[str, int]) -> dict[str, int]:
        """The sums over ranks of integer counts (same keys on every rank; int64, exact)."""
        if not self.enabled:
            return dict(counts)
        keys = sorted(counts)
        t = torch.tensor([int(counts[k]) for k in keys], dtype=torch.long, device=self.comm_device)
        with self._guard():
            tdist.all_reduce(t, op=tdist.ReduceOp.SUM)
        return dict(zip(keys, (int(v) for v in t.tolist())))

    def any(self, flag: bool) -> bool:
        """True on every rank when `flag` is true on some rank."""
        if not self.enabled:
            return bool(flag)
        t = torch.tensor([1 if flag else 0], dtype=torch.long, device=self.comm_device)
        with self._guard():
            tdist.all_reduce(t, op=tdist.ReduceOp.MAX)
        return bool(t.item())

    def max_int(self, value: int) -> int:
        if not self.enabled:
            return int(value)
        t = torch.tensor([int(value)], dtype=torch.long, device=self.comm_device)
        with self._guard():
            tdist.all_reduce(t, op=tdist.ReduceOp.MAX)
        return int(t.item())

    def gather_objects(self, obj) -> list:
        """[obj of rank 0, obj of rank 1, ...] on every rank (picklable objects: metric rows)."""
        if not self.enabled:
            return [obj]
        out = [None] * self.world_size
        with self._guard():
            tdist.all_gather_object(out, obj)
        return out

    def broadcast_object(self, obj):
        """Rank 0's `obj` on every rank."""
        if not self.enabled:
            return obj
        box = [obj]
        with self._guard():
            tdist.broadcast_object_list(box, src=0)
        return box[0]

    def on_main(self, fn):
        """fn() on rank 0 only (file-system changes); its result, or its error (re-raised as the same type),
        on every rank."""
        if not self.enabled:
            return fn()
        res = err = None
        if self.is_main:
            try:
                res = fn()
            except (ValueError, RuntimeError, OSError) as e:
                err = e
        res, err = self.broadcast_object((res, err))
        if err is not None:
            raise err
        return res

    def barrier(self) -> None:
        if self.enabled:
            with self._guard():
                tdist.barrier()

    @property
    def comm_device(self) -> torch.device:
        if self.enabled and tdist.get_backend() == "nccl":
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")

    # -------------------------------------------------------------------------------------- work split
    def shard(self, items: list, key_total: str = "rollout.prompts_per_step") -> list:
        """This rank's contiguous slice of the step's global list (len divisible by world_size)."""
        n, w = len(items), self.world_size
        if n % w:
            raise ValueError(f"{key_total} = {n} does not split over dist/world_size = {w} processes")
        k = n // w
        return items[self.rank * k:(self.rank + 1) * k]

    def seed_step(self, seed: int, step: int) -> None:
        """Distributed runs: torch / python / numpy RNGs from (seed, step, rank) at the start of a step."""
        s = step_seed(seed, step, self.rank)
        import random
        random.seed(s)
        torch.manual_seed(s)
        if "numpy" in __import__("sys").modules:
            import numpy as np
            np.random.seed(s % (2 ** 32))


def as_float(x) -> float:
    """A scalar tensor (a DTensor under FSDP2: the gradient norm over all shards) as a float."""
    return float(x.full_tensor() if hasattr(x, "full_tensor") else x)


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """A state_dict value as a full tensor: an FSDP2 shard (DTensor) all-gathered, a plain tensor as it is.
    Collective for DTensors: every rank calls it for the same tensors in the same order. A shard that
    dist.cpu_offload keeps on the host goes to the mesh's device for the gather (nccl gathers device memory)."""
    from torch.distributed.tensor import DTensor

    if not isinstance(t, DTensor):
        return t
    local = t.to_local()
    if local.device.type != t.device_mesh.device_type:
        t = DTensor.from_local(local.to(t.device_mesh.device_type), t.device_mesh, t.placements,
                               run_check=False, shape=t.shape, stride=t.stride())
    return t.full_tensor()


def step_seed(seed: int, step: int, rank: int) -> int:
    """A 63-bit seed from (seed, step, rank), independent of the run's history."""
    h = hashlib.sha256(f"fastprerl:{seed}:{step}:{rank}".encode()).digest()
    return int.from_bytes(h[:8], "little") >> 1


def under_torchrun() -> bool:
    return all(k in os.environ for k in TORCHRUN_ENV)


def init(device_name: str, timeout_s: float) -> Dist:
    """The process group from torchrun's environment (a plain process: Dist() with enabled False).

    device_name: run.device; on CUDA every rank uses the GPU LOCAL_RANK and nccl, else gloo."""
    if not under_torchrun():
        return Dist()
    if timeout_s <= 0:
        raise ValueError(f"dist.timeout_s: expected seconds > 0, got {timeout_s!r}")
    rank, world, local = (int(os.environ[k]) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))
    cuda = device_name == "cuda" or (device_name == "auto" and torch.cuda.is_available())
    if cuda:
        torch.cuda.set_device(local)
    if not tdist.is_initialized():
        tdist.init_process_group(backend="nccl" if cuda else "gloo",
                                 timeout=datetime.timedelta(seconds=timeout_s))
    return Dist(rank=rank, world_size=world, local_rank=local, enabled=True, timeout_s=timeout_s)


def shutdown() -> None:
    """Destroys the process group when there is one."""
    if tdist.is_available() and tdist.is_initialized():
        tdist.destroy_process_group()


@contextlib.contextmanager
def _timeout_named(timeout_s: float):
    """Re-raises a collective's timeout as CollectiveTimeout naming dist.timeout_s."""
    try:
        yield
    except (RuntimeError, tdist.DistError) as e:
        if is_timeout(e):
            raise CollectiveTimeout(timeout_message(timeout_s, e)) from e
        raise


def is_timeout(e: BaseException) -> bool:
    text = str(e).lower()
    return isinstance(e, getattr(tdist, "DistBackendError", ())) or "timed out" in text or "timeout" in text


def timeout_message(timeout_s: float, e: BaseException) -> str:
    return (f"a collective did not finish within dist.timeout_s = {timeout_s:g} s: another rank died, hangs "
            f"or stopped early ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})")


# ------------------------------------------------------------------------------------------ FSDP2
class LossRoot(torch.nn.Module):
    """The FSDP2 root: holds the Hugging Face model (`self.model`). `root(fn)` runs fn(model) inside the
    root's forward, so the root's parameters (embeddings, final norm, LM head) are all-gathered for the call
    and their gradients reduce-scattered in backward; the trainer's per-micro-batch forward + fused
    log-prob loss is such an fn."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, fn):
        return fn(self.model)


def decoder_layers(model) -> list[torch.nn.Module]:
    layers = getattr(decoder_of(model), "layers", None)
    if layers is None:
        raise ValueError(f"{type(model).__name__}: no decoder .layers to shard with FSDP2")
    return list(layers)


def shard_model(model, d: Dist, dtype: torch.dtype, cpu_offload: bool = False) -> LossRoot:
    """fully_shard over every decoder layer and a LossRoot around the model (module docstring); the
    gradient divide factor is 1 (sum over ranks). cpu_offload: FSDP2's CPUOffloadPolicy (sharded parameters,
    gradients and the optimizer step on the CPU)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

    dev = next(model.parameters()).device
    mesh = init_device_mesh(dev.type, (d.world_size,))
    kw = dict(mesh=mesh, mp_policy=MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32),
              offload_policy=CPUOffloadPolicy(pin_memory=dev.type == "cuda") if cpu_offload else OffloadPolicy())
    layers = decoder_layers(model)
    for layer in layers:
        fully_shard(layer, **kw)
    root = LossRoot(model)
    fully_shard(root, **kw)
    for m in layers + [root]:
        m.set_gradient_divide_factor(1.0)
        m.set_force_sum_reduction_for_comms(True)   # plain SUM collectives (gloo has no PREMUL_SUM)
    with torch.no_grad():   # FSDP2's lazy init runs on the root's first forward: before any generate()
        root(lambda m: None)
    root.reshard()          # the root keeps its weights gathered after a forward: back to the shards, so
    return root             # that model.parameters() (the optimizer's) are the sharded parameters


def fsdp_modules(root: torch.nn.Module) -> list:
    from torch.distributed.fsdp import FSDPModule

    return [m for m in root.modules() if isinstance(m, FSDPModule)]


@contextlib.contextmanager
def full_weights(root: torch.nn.Module | None):
    """Every FSDP module unsharded once for the block (generate(): many forwards, no gather per token);
    resharded after it. root None (a plain process): nothing to do."""
    if root is None:
        yield
        return
    layers = [m for m in fsdp_modules(root) if m is not root]   # the root never reshards after forward
    for m in layers:
        m.set_reshard_after_forward(False, recurse=False)
    for m in [root] + layers:
        m.unshard()
    try:
        yield
    finally:
        for m in [root] + layers:
            m.reshard()
        for m in layers:
            m.set_reshard_after_forward(True, recurse=False)


def check_distributed(cfg, world_size: int) -> None:
    """What a run under torchrun needs and what it does not do (yet): a batch that splits over the processes;
    no vLLM engine with LoRA (the merged-adapter push from FSDP2 shards is not built) and no
    optim.offload_optimizer_state (FSDP2's own CPU offload, dist.cpu_offload, replaces it there)."""
    P, G = cfg.rollout.prompts_per_step, cfg.rollout.samples_per_prompt
    if P % world_size:
        raise ValueError(f"rollout.prompts_per_step = {P} does not split over the {world_size} processes of "
                         f"this torchrun (WORLD_SIZE, --nproc_per_node x --nnodes): each process takes "
                         f"prompts_per_step / world_size prompts (and their rollout.samples_per_prompt = {G} "
                         f"samples); choose a multiple of {world_size}")
    refused = [
        (cfg.rollout.backend == "vllm" and cfg.model.lora.r > 0,
         "rollout.backend = 'vllm' with model.lora.r > 0: pushing the merged adapter from FSDP2 shards into the "
         "engines is not built; use rollout.backend = 'hf' or train LoRA in one process"),
        (cfg.optim.offload_optimizer_state, "optim.offload_optimizer_state = true: under torchrun use "
                                            "dist.cpu_offload = true (FSDP2's CPUOffloadPolicy) instead"),
    ]
    for bad, why in refused:
        if bad:
            raise ValueError(f"{why} (this run is under torchrun with {world_size} process(es))")
