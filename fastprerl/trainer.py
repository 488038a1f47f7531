"""The training loop: rollout -> score -> terms -> pack -> loss -> backward -> step -> metrics, every step.

The step loss (objectives.py states every part exactly). A step samples G responses y_i for each of its P
prompts x (B = P * G samples) with the current policy at temperature T, scores them (rewards r_i, verdicts),
and forms for every objective o of the phase per-sample advantages A_{o,i} and masks. With the log-probs
logp_t = log softmax(logits / T)[y_t] of the response tokens, in the view the objective scores (cond:
log P(y_t | x, y_<t); free: log P(y_t | e, y_<t), e = the empty-context token),

    L = sum_o weight_o / N_o * sum_{i in mask_o} sum_t w_t * l(logp_t, old_t, A_{o,i})
        + kl_coef / N * sum_{cond tokens} k3(logp_t, ref_t)

with l the PPO clip with dual-clip (old_t = logp_t detached unless algo.old_logp = "rollout", so rho = 1
on-policy), N_o the kept tokens of o in the whole step (not per micro-batch), N the step's response tokens,
w_t the truncated importance weight of cond tokens (algo.tis_cap; else 1). Only the rows a term uses are
packed (packing.select_rows), cut into bins of optim.max_tokens_per_microbatch tokens; the bins change the
arithmetic's grouping, not the loss. Then gradient clipping and one AdamW step; the schedule picks the phase.

Durability (state/checkpointer.py, state/resume.py, stops.py): a checkpoint holds everything the loop carries from one
step to the next, so a resumed run is bit-identical on CPU to one that never stopped. SIGINT/SIGTERM finish the
step and write a checkpoint; a second one abandons it. A non-finite reward, loss or gradient norm stops the run
(NonFiniteError) before the optimizer step, with the batch statistics.

Under torchrun (distributed.py states the decisions): every process samples and scores its slice of the step's
prompts, the normalisers N_o and N count the tokens of all processes, the model is sharded by FSDP2 and each
micro-batch's forward + fused loss runs inside the FSDP2 root (`self.root`), every process runs as many
micro-batch passes as the busiest one (passes.py: idle passes add exactly 0 to the gradients), the metrics row
is reduced over processes and written by rank 0, checkpoints are DCP, and a signal on any process stops all of
them after the same step. The KL reference model has its own FSDP2 root (`self.ref_root`); periodic evaluation
runs on rank 0 on the gathered full weights. A plain process (no torchrun environment) runs none of this:
self.root and self.ref_root are None and every collective helper is the identity.
"""
from __future__ import annotations

import copy
import importlib.util
import logging
import math
import random
import sys
import time
from pathlib import Path

import torch

from . import distributed
from . import objectives as obj
from .config import Config
from .config_parse import naming
from .data import PromptStream, fit_prompts, format_prompt, load_problems
from .kernels import resolve_impl
from .metrics import MetricsLogger, NoMetrics, reduce_rows, sample_records, step_metrics
from .models import DTYPES, choose_device, context_length, empty_context_token, load_model, load_tokenizer
from .optim import make_optimizer, optimizer_step
from .packing import pack, select_rows
from .passes import BinPasses
from .phases import Schedule
from .rewards import from_config as reward_fn_from_config
from .rewards import score_responses
from .rollout import make_backend
from .state import resume
from .state.checkpointer import Checkpointer, RNGState
from .stops import NonFiniteError, StepAbandoned, StopSignals, batch_report, check_rewards

log = logging.getLogger("fastprerl")


def check_startup(cfg, device: torch.device, dist=None) -> None:
    """What must hold before anything loads: the wandb package when logging.wandb, a usable logprob_impl;
    under torchrun (dist: distributed.Dist) `distributed.check_distributed`."""
    if cfg.logging.wandb and importlib.util.find_spec("wandb") is None:
        raise RuntimeError("logging.wandb = true but the `wandb` package is not installed: pip install wandb "
                           "(or set logging.wandb = false)")
    if dist is not None and dist.enabled:
        distributed.check_distributed(cfg, dist.world_size)
    try:
        resolve_impl(cfg.model.logprob_impl, device)
    except RuntimeError:
        raise RuntimeError(f"model.logprob_impl = {cfg.model.logprob_impl!r} needs a CUDA device and the triton "
                           f"package (or TRITON_INTERPRET=1, for tests); this run is on {device.type}. "
                           f"Choose 'auto' (Triton on CUDA, torch elsewhere), 'torch' or 'naive'") from None


class Trainer:
    def __init__(self, cfg: Config, config_file: str | None = None):   # the CLI's CONFIG: never overwritten
        self.cfg, self.config_file = cfg, config_file
        self.dist = distributed.init(cfg.run.device, cfg.dist.timeout_s)
        if not self.dist.is_main:
            log.setLevel(logging.WARNING)   # the console is rank 0's
        self.out = Path(cfg.run.output_dir)
        self.ckpt_root = self.out / "checkpoints"
        self.device = choose_device(cfg.run.device)
        if self.device.type == "cuda" and self.dist.enabled:
            self.device = torch.device("cuda", self.dist.local_rank)
        check_startup(cfg, self.device, self.dist)
        resume_from, keep_config_file = self.dist.on_main(
            lambda: resume.prepare_output_dir(cfg, config_file, self.out, self.ckpt_root))
        if cfg.run.threads:
            torch.set_num_threads(cfg.run.threads)
        random.seed(cfg.run.seed)
        torch.manual_seed(cfg.run.seed)
        with naming("data.source", cfg.data.source):   # a bad data file stops the start before the model loads
            problems = load_problems(cfg.data, cfg.run.seed)

        with naming("model.path", cfg.model.path):
            self.tok = load_tokenizer(cfg.model.path)
            self.model = self.load_policy().to(self.device)
        self.empty_token = empty_context_token(self.tok, cfg.model.empty_token)
        self.ref_model = None
        if cfg.algo.kl_coef > 0:
            self.ref_model = copy.deepcopy(self.model).eval().requires_grad_(False)
        self.root = self.ref_root = None   # under torchrun: the FSDP2 roots (distributed.LossRoot) of both
        if self.dist.enabled:
            shard = dict(d=self.dist, dtype=DTYPES[cfg.model.dtype], cpu_offload=cfg.dist.cpu_offload)
            self.root = distributed.shard_model(self.model, **shard)
            if self.ref_model is not None:   # its own root, sharded like the policy, never given a gradient
                self.ref_root = distributed.shard_model(self.ref_model, **shard)
        passes = dict(dist=self.dist, empty_token=self.empty_token, temperature=cfg.rollout.temperature,
                      impl=cfg.model.logprob_impl)
        self.passes = BinPasses(self.model, self.root, **passes)
        self.ref_passes = BinPasses(self.ref_model, self.ref_root, **passes) if self.ref_model is not None else None
        self.schedule = Schedule(cfg.schedule)
        self.optimizer, self.scheduler = make_optimizer(self.model, self.cfg.optim)
        problems = fit_prompts(problems, cfg.data, self.tok, context_length(cfg.rollout, self.model), cfg.rollout)
        self.stream = PromptStream(problems, cfg.run.seed, cfg.data.shuffle)
        self.rollout = make_backend(cfg.rollout, self.model, self.tok, seed=cfg.run.seed)
        self.reward_fn = reward_fn_from_config(cfg.reward)
        self.step = 0                       # completed steps = the index of the next step
        self.last_checkpoint: Path | None = None
        self.checkpointer = Checkpointer(self.ckpt_root, model=self.model, tokenizer=self.tok,
                                         optimizer=self.optimizer, scheduler=self.scheduler, config=cfg,
                                         ref_model=self.ref_model, fsdp_root=self.root, dist=self.dist,
                                         keep=cfg.run.keep_checkpoints)
        if resume_from is not None:
            state = self.checkpointer.load(resume_from)
            self.load_state_dict(state)
            RNGState.load_state_dict(state["rng"])   # last: everything that draws while it is built exists
            self.last_checkpoint = resume_from
            log.info("resuming from %s: step %d of %d", resume_from, self.step, self.schedule.total_steps)
        self.evaluator = None   # rank 0's (the other ranks take part in gathering the weights only)
        if cfg.eval.every > 0:
            self.dist.on_main(self._make_evaluator)
        self.dist.on_main(lambda: self._start_output_dir(resume_from, keep_config_file))   # the first write
        self.metrics = NoMetrics()
        if self.dist.is_main:
            self.metrics = MetricsLogger(self.out, tensorboard=cfg.logging.tensorboard,
                                         console=cfg.logging.console, start_step=self.step,
                                         run_config=cfg.to_dict(),
                                         wandb_project=cfg.logging.wandb_project if cfg.logging.wandb else None)

    def load_policy(self):
        """The policy as cfg.model builds it (on the CPU; LoRA: wrapped by PEFT)."""
        cfg = self.cfg
        return load_model(cfg.model.path, dtype=cfg.model.dtype, attn_implementation=cfg.model.attn_implementation,
                          seed=cfg.run.seed, gradient_checkpointing=cfg.model.gradient_checkpointing,
                          lora=cfg.model.lora)

    def _start_output_dir(self, resume_from: Path | None, keep_config_file: bool) -> None:
        resume.start_output_dir(self.out, self.cfg, resume_from, keep_config_file)
        if self.evaluator is not None:
            self.evaluator.open_log(self.step)

    def _make_evaluator(self) -> None:
        from .evaluation.periodic import PeriodicEval
        self.evaluator = PeriodicEval(self.cfg, self.tok, self.out, run_reward_fn=self.reward_fn,
                                      start_step=self.step, open_log=False)   # opened once the folder is set

    # ------------------------------------------------------------------ the loop
    def train(self) -> str:
        """Runs the schedule from `self.step`. Returns "complete" (final model in <output_dir>/final),
        "stopped" (first SIGINT/SIGTERM: the step finished and was checkpointed) or "abandoned" (second one:
        the step in progress was dropped; the newest checkpoint is unchanged). Raises NonFiniteError."""
        total = self.schedule.total_steps
        bar = None
        if self.cfg.logging.progress and self.dist.is_main:
            from tqdm import tqdm
            bar = tqdm(total=total, initial=self.step, desc="train", unit="step", file=sys.stderr,
                       dynamic_ncols=True)
        write = bar.write if bar is not None else None
        status = "complete"
        try:
            with StopSignals() as stop:
                while self.step < total:
                    if self.dist.enabled:   # the sampling RNG of a step: (seed, step, rank), not the history
                        self.dist.seed_step(self.cfg.run.seed, self.step)
                    self._maybe_evaluate(total, write)
                    _, phase = self.schedule.phase_at(self.step)
                    if self.schedule.is_switch(self.step):
                        self._switch_phase(phase)
                    row = {"step": self.step, "phase": phase.name, **self.train_step(phase)}
                    row.update(self.schedule.observe(self.step, row))   # adaptive switch: may end the phase
                    self.metrics.log(row, write=write)
                    self.step += 1
                    if bar is not None:
                        bar.update(1)
                        bar.set_postfix(reward=f"{row['reward/mean']:.3f}", phase=phase.name)
                    every = self.cfg.run.checkpoint_every
                    stopping = self.dist.any(stop.requested is not None)   # a signal on any process
                    if self.step == total or (every > 0 and self.step % every == 0) or stopping:
                        self.save_checkpoint()
                    if stopping and self.step < total:
                        status = "stopped"
                        log.warning("%s: stopped after step %d; checkpoint %s; continue with --resume",
                                    stop.requested or "a signal on another process", self.step - 1,
                                    self.last_checkpoint)
                        break
                if status == "complete":
                    self._maybe_evaluate(total, write)
                    self.checkpointer.save_final(self.out, merge_lora=self.cfg.run.merge_lora,
                                                 plain_model=self.load_policy)
        except StepAbandoned as e:
            status = "abandoned"
            log.warning("%s again: abandoned step %d; newest checkpoint: %s", e, self.step,
                        self.last_checkpoint or "none")
        finally:
            if bar is not None:
                bar.close()
            self.metrics.close()
        return status

    def _maybe_evaluate(self, total: int, write=None):
        """eval.every: evaluate the current weights (self.step completed steps) and log a row of phase "eval".
        Under torchrun every rank gathers the full weights (full_weights) and rank 0 alone evaluates them, with
        the code and sampling RNG of one process, so the numbers are those one process gets for these weights;
        the other ranks wait for its result (within dist.timeout_s)."""
        if self.cfg.eval.every <= 0:   # no evaluation: nothing of it is imported
            return
        from .evaluation.periodic import due

        if not due(self.cfg.eval.every, self.step, total):
            return
        t0 = time.perf_counter()
        with distributed.full_weights(self.root):
            result = self.dist.on_main(lambda: self.evaluator.run(self.model, self.step))
        row = {"step": self.step, "phase": "eval", **result,
               "perf/eval_s": time.perf_counter() - t0, "dist/world_size": self.dist.world_size}
        self.metrics.log(row, write=write)

    def _switch_phase(self, phase):
        """Policy reincarnation: same weights; optionally a fresh optimizer and a re-synced reference."""
        sch = self.cfg.schedule
        if sch.reset_optimizer_at_switch:
            self.optimizer, self.scheduler = make_optimizer(self.model, self.cfg.optim)
        if sch.resync_reference_at_switch and self.ref_model is not None:
            self.ref_model.load_state_dict(self.model.state_dict())
        log.info("step %d: switching to phase %r", self.step, phase.name)

    # ------------------------------------------------------------------ one step
    def train_step(self, phase) -> dict:
        cfg, t0 = self.cfg, time.perf_counter()
        G = cfg.rollout.samples_per_prompt

        # --- rollout: G completions per prompt, sampled WITH the prompt in every phase
        problems = self.dist.shard(self.stream.next_batch(cfg.rollout.prompts_per_step))   # this process's
        own = getattr(self.rollout, "holds_weights", False)   # an engine with its own copy (vLLM): no gather
        with distributed.full_weights(None if own else self.root):   # gathered once for the whole generate call
            roll = self.rollout.generate([format_prompt(p, cfg.data, self.tok) for p in problems], G)
        samples = [problems[i // G] for i in range(len(roll.response_ids))]                 # (B,)
        texts = self.tok.batch_decode(roll.response_ids, skip_special_tokens=True)
        t_roll = time.perf_counter()

        # --- score
        scores = score_responses(self.reward_fn, texts, samples)
        rewards = torch.tensor(scores.score, dtype=torch.float32)                           # (B,)
        resp_lens = torch.tensor([len(r) for r in roll.response_ids], dtype=torch.long)     # (B,)
        report = dict(rewards=rewards, resp_lens=resp_lens, truncated=roll.truncated)
        check_rewards(self.dist, self.step, scores, texts, samples)   # every reward failed: RewardFailure
        if self.dist.any(not torch.isfinite(rewards).all()):
            raise NonFiniteError(self._stop_message(batch_report(self.step, phase.name, "non-finite rewards",
                                                                 texts=texts, **report)))
        t_rew = time.perf_counter()

        # --- terms: advantages and masks of every objective of the phase
        terms = obj.phase_terms(phase.objectives, rewards, G, cfg.algo,
                                verdicts=torch.tensor(scores.correct, dtype=torch.float32))

        # --- pack only the rows some loss term uses
        use_kl = self.ref_model is not None and any(t.view == "cond" for t in terms.values())
        need = select_rows(terms, len(samples), all_cond=use_kl, both_views=cfg.logging.view_gap)
        batch = pack(roll.prompt_ids, roll.response_ids, cond=need["cond"].tolist(), free=need["free"].tolist(),
                     empty_token=self.empty_token, max_tokens=cfg.optim.max_tokens_per_microbatch)
        behaviour = torch.tensor([roll.behaviour_logp[s][p] for s, p in                     # (R,)
                                  zip(batch.row_sample.tolist(), batch.row_pos.tolist())], dtype=torch.float32)

        # --- loss: the step's objective over the packed rows, built once
        loss_fn = obj.StepLoss.build(terms, {o.name: o.weight for o in phase.objectives}, resp_lens,
                                     row_sample=batch.row_sample, cond=batch.view_mask("cond"),
                                     behaviour=behaviour, algo=cfg.algo,
                                     ref=self.ref_passes.logp(batch) if use_kl else None,
                                     totals=self.dist.all_reduce_counts if self.dist.enabled else None)

        # --- backward: one forward per bin, fused log-prob + loss, gradients accumulate
        loss, diag, entropy = self.passes.backward(batch, loss_fn, entropy=cfg.logging.entropy)

        # --- step
        grad_norm = distributed.as_float(torch.nn.utils.clip_grad_norm_(
            self.model.parameters(), cfg.optim.grad_clip if cfg.optim.grad_clip > 0 else float("inf")))
        if self.dist.any(not (math.isfinite(loss) and math.isfinite(grad_norm))):
            self.optimizer.zero_grad(set_to_none=True)
            what = "non-finite loss" if not math.isfinite(loss) else "non-finite gradient norm"
            raise NonFiniteError(self._stop_message(batch_report(
                self.step, phase.name, what, terms=terms, rows=batch.rows.numel(), bins=len(batch.bins),
                loss=loss, grad_norm=grad_norm, **report)))
        sync_s = 0.0
        has_rows = self.dist.all_reduce_counts({"rows": batch.rows.numel()})["rows"] > 0
        if optimizer_step(self.optimizer, self.scheduler, self.model, has_rows, cfg.optim.step_on_zero_grad):
            sync_s = self.rollout.sync_weights(self.model)
        self.optimizer.zero_grad(set_to_none=True)
        t_end = time.perf_counter()

        # --- metrics
        m, weights = step_metrics(group_size=G, rewards=rewards, scores=scores, resp_lens=resp_lens,
                                  truncated=roll.truncated, texts=texts, batch=batch, loss=loss, grad_norm=grad_norm,
                                  diag=diag, entropy=entropy, behaviour=behaviour, terms=terms,
                                  tis_cap=cfg.algo.tis_cap, view_gap=cfg.logging.view_gap)
        m.update({"perf/rollout_s": t_roll - t0, "perf/reward_s": t_rew - t_roll, "perf/train_s": t_end - t_rew,
                  "perf/step_s": t_end - t0, "perf/weight_sync_s": sync_s})
        if self.dist.enabled:   # one row of the whole step from every process's row of its samples
            rows, counts = zip(*self.dist.gather_objects((m, weights)))
            m = reduce_rows(list(rows), list(counts))
        m["dist/world_size"] = self.dist.world_size
        if cfg.logging.samples_every and self.step % cfg.logging.samples_every == 0:
            records = sample_records(samples, texts, scores, roll, terms)
            self.metrics.log_samples(self.step, [r for part in self.dist.gather_objects(records) for r in part])
        return m

    def _stop_message(self, report: str) -> str:
        return (f"{report}\n  newest checkpoint: {self.last_checkpoint or 'none'}; metrics of the earlier steps "
                f"are in {self.out / 'metrics.jsonl'}")

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict:
        """The loop's state after `self.step` completed steps: the step, its phase, the schedule's and the prompt
        stream's states (JSON-able). Weights, optimizer, LR scheduler and RNG are the checkpointer's."""
        return {"step": self.step, "phase": self.schedule.phase_at(self.step - 1)[1].name,
                "total_steps": self.schedule.total_steps, "data": self.stream.state_dict(),
                "schedule": self.schedule.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.step = int(state["step"])
        self.stream.load_state_dict(state["data"])
        self.schedule.load_state_dict(state.get("schedule"))   # absent in checkpoints of fixed schedules

    def save_checkpoint(self) -> Path:
        """Checkpoint of the state after `self.step` completed steps (state/checkpointer.py)."""
        self.last_checkpoint = self.checkpointer.save(self.step, self.state_dict())
        log.info("step %d: wrote %s", self.step, self.last_checkpoint)
        return self.last_checkpoint
