"""The training loop, top to bottom: rollout -> reward -> advantages -> pack -> fused loss -> step -> metrics,
checkpoint.

Durability: a checkpoint (checkpoint.py) holds everything the loop carries from one step to the next, so a
run resumed from it (run.resume / --resume) is bit-identical on CPU to one that never stopped. SIGINT/SIGTERM
finish the current step and write a checkpoint; a second one abandons the step at once. A non-finite reward,
loss or gradient norm stops the run (NonFiniteError) before the optimizer step, with the batch statistics.
"""
from __future__ import annotations

import contextlib
import copy
import importlib.util
import logging
import math
import os
import random
import shutil
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Dict, List, Optional

import torch

from . import checkpoint as ckpt
from . import objectives as obj
from .config import Config, to_toml
from .data import PromptStream, format_prompt, load_problems
from .kernels import resolve_impl, token_logprobs_no_grad, token_loss
from .metrics import MetricsLogger, behaviour_counts
from .models import empty_context_token, lm_head_weight, load_model, load_tokenizer
from .optim import CPUOffloadAdamW
from .packing import bin_hidden, pack
from .rewards import get_reward_fn
from .rollout import make_backend
from .schedule import Schedule

log = logging.getLogger("fastprerl")

# What a run writes into run.output_dir besides checkpoints/. A run that starts at step 0 first moves an
# earlier run's copies to previous/<UTC time>/, so that nothing of it is overwritten or deleted (a config.toml
# alone is left to be overwritten: it is all that a run which failed to start writes).
RUN_OUTPUTS = ("config.toml", "metrics.jsonl", "samples.jsonl", "eval.jsonl", "tensorboard", "wandb_id.txt",
               "final")


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("run.device = 'cuda' but no CUDA device is available")
    return torch.device(name)


def _check_logprob_impl(impl: str, device: torch.device) -> None:
    try:
        resolve_impl(impl, device)
    except RuntimeError:
        raise RuntimeError(f"model.logprob_impl = {impl!r} needs a CUDA device and the triton package (or "
                           f"TRITON_INTERPRET=1, for tests); this run is on {device.type}. Choose 'auto' (Triton "
                           f"on CUDA, torch elsewhere), 'torch' or 'naive'") from None


@contextlib.contextmanager
def _naming(key: str, value: str):
    """An OSError (a missing folder or file, no network) or a ValueError (a folder that holds no model or
    tokenizer) is re-raised, as the same kind, naming the config key that gave the path; fastprerl's own
    errors, which already start with the key, pass unchanged."""
    try:
        yield
    except (OSError, ValueError) as e:
        if str(e).startswith(key):
            raise
        kind = OSError if isinstance(e, OSError) else ValueError
        raise kind(f"{key} = {value!r}: {e}") from e


def _set_aside_earlier_outputs(out: Path) -> Optional[Path]:
    """Moves the RUN_OUTPUTS found in `out` to a new folder out/previous/<UTC time>/ and returns it; None when
    `out` holds no earlier results."""
    found = [out / name for name in RUN_OUTPUTS if (out / name).exists()]
    if all(p.name == "config.toml" for p in found):
        return None
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    dest, n = out / "previous" / stamp, 0
    while True:
        try:
            dest.mkdir(parents=True)
            break
        except FileExistsError:
            n += 1
            dest = dest.with_name(f"{stamp}-{n}")
    for p in found:
        os.replace(p, dest / p.name)
    log.warning("run.output_dir %s held the outputs of an earlier run (%s); moved them to %s", out,
                ", ".join(p.name for p in found), dest)
    return dest


def _score(reward_fn, texts: List[str], samples: List[Dict]):
    """Scores (B,), has-answer flags (B,) and verdicts (B,) from a reward function's results."""
    out = reward_fn(texts, samples)
    scores = [float(getattr(r, "score", r)) for r in out]
    has = [bool(getattr(r, "has_answer", True)) for r in out]
    correct = [float(getattr(r, "correct", getattr(r, "score", r))) for r in out]
    return scores, has, correct


class NonFiniteError(FloatingPointError):
    """A reward, the loss or the gradient norm of a step is NaN/inf; the step was not applied."""


class StepAbandoned(BaseException):
    """Raised by the second SIGINT/SIGTERM (a BaseException, so that no `except Exception` swallows it)."""


class StopSignals:
    """First SIGINT/SIGTERM: `requested` is set and the loop stops after the current step and a checkpoint.
    Second one: StepAbandoned is raised wherever the loop is; the newest checkpoint stays as it was."""

    def __init__(self):
        self.requested: Optional[str] = None
        self._previous = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for s in (signal.SIGINT, signal.SIGTERM):
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def _handle(self, signum, frame):
        name = signal.Signals(signum).name
        if self.requested is None:
            self.requested = name
            print(f"fastprerl: {name}: finishing this step, then writing a checkpoint "
                  f"(press Ctrl-C again to stop at once)", file=sys.stderr, flush=True)
            return
        raise StepAbandoned(name)

    def __exit__(self, *exc):
        for s, h in self._previous.items():
            signal.signal(s, h)
        return False


def _batch_report(step: int, phase: str, problem: str, *, rewards, resp_lens, truncated, terms=None,
                  rows: Optional[int] = None, bins: Optional[int] = None, loss: Optional[float] = None,
                  grad_norm: Optional[float] = None, texts: Optional[List[str]] = None) -> str:
    """The message of a NonFiniteError: what went wrong and the statistics of the step's batch."""
    def stats(x: torch.Tensor) -> str:
        x = x.float()
        bad = int((~torch.isfinite(x)).sum())
        fin = x[torch.isfinite(x)]
        rng = f"min {fin.min().item():.4g}, max {fin.max().item():.4g}, " if fin.numel() else ""
        return f"mean {x.mean().item():.4g}, {rng}non-finite {bad} of {x.numel()}"

    lines = [f"step {step} (phase {phase!r}): {problem}; the step was not applied to the weights.",
             f"  rewards: {stats(rewards)}",
             f"  response length: mean {resp_lens.float().mean().item():.1f}, max {int(resp_lens.max())} tokens; "
             f"truncated {sum(truncated)} of {len(truncated)}"]
    for name, t in (terms or {}).items():
        lines.append(f"  {name}: {int(t.mask.sum())} samples in the loss; advantages {stats(t.advantage)}")
    if rows is not None:
        lines.append(f"  packed rows {rows} in {bins} micro-batches; loss {loss}; grad norm {grad_norm}")
    if texts:
        bad = [i for i, r in enumerate(rewards.tolist()) if not math.isfinite(r)][:3]
        lines += [f"  sample {i}: reward {rewards[i].item()} for response {texts[i]!r}" for i in bad]
    return "\n".join(lines)


def _make_reward_fn(rc):
    """rc: RewardConfig. Built-in reward functions take the options; a user's module:function none."""
    if ":" in rc.fn:
        return get_reward_fn(rc.fn)
    opts = {"timeout": rc.timeout, "workers": rc.workers, "format_penalty": rc.format_penalty}
    if rc.fn == "math":
        opts["extract"] = tuple(rc.extract)
    return get_reward_fn(rc.fn, **opts)


def backward_packed(model, batch, loss_rows, *, temperature: float, impl: str = "auto",
                    with_entropy: bool = False):
    """Forward + fused loss + backward, one bin (micro-batch) at a time; gradients accumulate in the model.

    loss_rows(logp, ridx) -> per-token losses of packed rows ridx (indices into batch.rows); it carries
    the step's normalisers, so the summed loss equals the step loss whatever the bins are.
    Returns (summed loss value, per-row entropy (R,) or None)."""
    W = lm_head_weight(model)
    R = batch.rows.numel()
    entropy = torch.zeros(R) if with_entropy else None
    total = 0.0
    for b in range(len(batch.bins)):
        ridx = batch.bin_row_index(b)
        if ridx.numel() == 0:
            continue
        hid = bin_hidden(model, batch, b)
        h_sel = hid.index_select(0, (batch.rows[ridx] - batch.bins[b][0]).to(hid.device))
        tg = batch.targets[ridx].to(hid.device)
        ent = torch.empty(ridx.numel(), device=hid.device) if with_entropy else None
        loss = token_loss(h_sel, W, tg, lambda lp, i: loss_rows(lp, ridx[i.cpu()]),
                          temperature=temperature, impl=impl, entropy_out=ent)
        loss.backward()
        total += loss.item()
        if with_entropy:   # from the loss's own vocabulary sweep: no second pass over the LM head
            entropy[ridx] = ent.cpu()
    return total, entropy


class Trainer:
    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.out = Path(cfg.run.output_dir)
        self.ckpt_root = self.out / "checkpoints"
        resume_from = self._resume_point()
        if cfg.logging.wandb and importlib.util.find_spec("wandb") is None:
            raise RuntimeError("logging.wandb = true but the `wandb` package is not installed: pip install wandb "
                               "(or set logging.wandb = false)")
        self.device = _device(cfg.run.device)
        _check_logprob_impl(cfg.model.logprob_impl, self.device)
        if resume_from is None:
            _set_aside_earlier_outputs(self.out)
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / "config.toml").write_text(to_toml(cfg))
        if cfg.run.threads:
            torch.set_num_threads(cfg.run.threads)
        random.seed(cfg.run.seed)
        torch.manual_seed(cfg.run.seed)

        with _naming("model.path", cfg.model.path):
            self.tok = load_tokenizer(cfg.model.path)
            self.model = load_model(cfg.model.path, dtype=cfg.model.dtype,
                                    attn_implementation=cfg.model.attn_implementation, seed=cfg.run.seed,
                                    gradient_checkpointing=cfg.model.gradient_checkpointing).to(self.device)
        self.empty_token = empty_context_token(self.tok, cfg.model.empty_token)
        self.ref_model = None
        if cfg.algo.kl_coef > 0:
            self.ref_model = copy.deepcopy(self.model).eval().requires_grad_(False)

        self.schedule = Schedule(cfg.schedule)
        self.optimizer, self.scheduler = self._make_optimizer()
        with _naming("data.source", cfg.data.source):
            problems = load_problems(cfg.data, cfg.run.seed)
        self.stream = PromptStream(problems, cfg.run.seed, cfg.data.shuffle)
        self.rollout = make_backend(cfg.rollout, self.model, self.tok, seed=cfg.run.seed)
        self.reward_fn = _make_reward_fn(cfg.reward)
        self.step = 0                       # completed steps = the index of the next step
        self.last_checkpoint: Optional[Path] = None
        if resume_from is not None:
            self._load_checkpoint(resume_from)   # restores the RNG states last
        self.evaluator = None
        if cfg.eval.every > 0:
            from .evaluate import PeriodicEval
            self.evaluator = PeriodicEval(cfg, self.tok, self.out, run_reward_fn=self.reward_fn,
                                          start_step=self.step)
        self.metrics = MetricsLogger(self.out, tensorboard=cfg.logging.tensorboard, console=cfg.logging.console,
                                     start_step=self.step, run_config=cfg.to_dict(),
                                     wandb_project=cfg.logging.wandb_project if cfg.logging.wandb else None)

    def _make_optimizer(self):
        """AdamW and its LR scheduler (constant LR, as the paper; kept so that checkpoints carry one)."""
        o = self.cfg.optim
        cls = CPUOffloadAdamW if o.offload_optimizer_state else torch.optim.AdamW
        opt = cls([p for p in self.model.parameters() if p.requires_grad], lr=o.lr,
                  betas=(o.beta1, o.beta2), eps=o.eps, weight_decay=o.weight_decay)
        return opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)

    # ------------------------------------------------------------------ checkpoints
    def _resume_point(self) -> Optional[Path]:
        """The checkpoint this run continues from (run.resume), checked against the config; None: step 0."""
        existing = ckpt.list_checkpoints(self.ckpt_root)
        if not self.cfg.run.resume:
            if existing:
                raise ckpt.ResumeError(
                    f"run.output_dir {str(self.out)!r} already holds checkpoints (newest: {existing[0][1].name}); "
                    f"pass --resume (run.resume = true) to continue that run, or choose another run.output_dir")
            return None
        path, skipped = ckpt.find_latest_valid(self.ckpt_root)
        if path is None:
            if skipped:
                raise ckpt.ResumeError(f"no complete checkpoint in {self.ckpt_root}: "
                                       + "; ".join(f"{p.name}: {why}" for p, why in skipped))
            log.info("no checkpoint in %s yet; starting at step 0", self.ckpt_root)
            return None
        ckpt.check_resume_config(path, self.cfg.to_dict())
        for p, _ in skipped:  # set aside, so that they are neither verified again nor counted as the newest
            aside = p.with_name(p.name + ".corrupt")
            while aside.exists():
                aside = aside.with_name(aside.name + "_")
            os.replace(p, aside)
            log.warning("moved the damaged checkpoint %s to %s", p, aside)
        return path

    def _load_checkpoint(self, path: Path):
        state = ckpt.load_checkpoint(path, model=self.model, optimizer=self.optimizer, scheduler=self.scheduler,
                                     ref_model=self.ref_model)
        self.step = int(state["step"])
        self.stream.load_state_dict(state["data"])
        ckpt.restore_rng(state["rng"])
        self.last_checkpoint = path
        log.info("resuming from %s: step %d of %d", path, self.step, self.schedule.total_steps)

    def save_checkpoint(self) -> Path:
        """Checkpoint of the state after `self.step` completed steps (see checkpoint.py for the contents)."""
        import transformers

        state = {"step": self.step, "phase": self.schedule.phase_at(self.step - 1)[1].name,
                 "total_steps": self.schedule.total_steps, "data": self.stream.state_dict(),
                 "versions": {"torch": torch.__version__, "transformers": transformers.__version__}}
        self.last_checkpoint = ckpt.save_checkpoint(
            self.ckpt_root, self.step, model=self.model, tokenizer=self.tok, optimizer=self.optimizer,
            scheduler=self.scheduler, ref_model=self.ref_model, state=state, config=self.cfg.to_dict(),
            config_toml=to_toml(self.cfg), keep=self.cfg.run.keep_checkpoints)
        log.info("step %d: wrote %s", self.step, self.last_checkpoint)
        return self.last_checkpoint

    def _checkpoint_due(self) -> bool:
        every = self.cfg.run.checkpoint_every
        return self.step == self.schedule.total_steps or (every > 0 and self.step % every == 0)

    # ------------------------------------------------------------------ the loop
    def train(self) -> str:
        """Runs the schedule from `self.step`. Returns "complete" (final model in <output_dir>/final),
        "stopped" (first SIGINT/SIGTERM: the step finished and was checkpointed) or "abandoned" (second one:
        the step in progress was dropped; the newest checkpoint is unchanged). Raises NonFiniteError."""
        total = self.schedule.total_steps
        bar = None
        if self.cfg.logging.progress:
            from tqdm import tqdm
            bar = tqdm(total=total, initial=self.step, desc="train", unit="step", file=sys.stderr,
                       dynamic_ncols=True)
        write = bar.write if bar is not None else None
        status = "complete"
        try:
            with StopSignals() as stop:
                while self.step < total:
                    self._maybe_evaluate(total, write)
                    phase_idx, phase = self.schedule.phase_at(self.step)
                    if self.schedule.is_switch(self.step):
                        self._switch_phase(phase)
                    row = self.train_step(phase)
                    row = {"step": self.step, "phase": phase.name, **row}
                    self.metrics.log(row, write=write)
                    self.step += 1
                    if bar is not None:
                        bar.update(1)
                        bar.set_postfix(reward=f"{row['reward/mean']:.3f}", phase=phase.name)
                    if self._checkpoint_due() or stop.requested:
                        self.save_checkpoint()
                    if stop.requested and self.step < total:
                        status = "stopped"
                        log.warning("%s: stopped after step %d; checkpoint %s; continue with --resume",
                                    stop.requested, self.step - 1, self.last_checkpoint)
                        break
                if status == "complete":
                    self._maybe_evaluate(total, write)
                    self.save_model(self.out / "final")
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
        """eval.every: evaluate the current weights (self.step completed steps) and log a row of phase "eval"."""
        if self.evaluator is None or not self.evaluator.due(self.step, total):
            return
        t0 = time.perf_counter()
        row = {"step": self.step, "phase": "eval", **self.evaluator.run(self.model, self.step),
               "perf/eval_s": time.perf_counter() - t0}
        self.metrics.log(row, write=write)

    def _switch_phase(self, phase):
        """Policy reincarnation: same weights; optionally a fresh optimizer and a re-synced reference."""
        sch = self.cfg.schedule
        if sch.reset_optimizer_at_switch:
            self.optimizer, self.scheduler = self._make_optimizer()
        if sch.resync_reference_at_switch and self.ref_model is not None:
            self.ref_model.load_state_dict(self.model.state_dict())
        log.info("step %d: switching to phase %r", self.step, phase.name)

    # ------------------------------------------------------------------ one step
    def train_step(self, phase) -> Dict:
        cfg, t0 = self.cfg, time.perf_counter()
        G, P = cfg.rollout.samples_per_prompt, cfg.rollout.prompts_per_step

        # 1-2. prompts and rollouts (sampled WITH the prompt, in every phase)
        problems = self.stream.next_batch(P)
        prompt_ids = [format_prompt(p, cfg.data, self.tok) for p in problems]
        roll = self.rollout.generate(prompt_ids, G)
        t_roll = time.perf_counter()
        B = len(roll.response_ids)
        samples = [problems[i // G] for i in range(B)]
        texts = self.tok.batch_decode(roll.response_ids, skip_special_tokens=True)

        # 3. rewards
        scores, has_answer, correct = _score(self.reward_fn, texts, samples)
        rewards = torch.tensor(scores, dtype=torch.float32)
        resp_lens = torch.tensor([len(r) for r in roll.response_ids], dtype=torch.long)
        report = dict(rewards=rewards, resp_lens=resp_lens, truncated=roll.truncated)
        if not torch.isfinite(rewards).all():
            raise NonFiniteError(self._stop_message(_batch_report(self.step, phase.name, "non-finite rewards",
                                                                  texts=texts, **report)))
        t_rew = time.perf_counter()

        # 4. advantages and masks of every objective of the phase
        a = cfg.algo
        terms = {o.name: obj.sample_terms(o.name, rewards, G, adv_norm=a.adv_norm, negative_rule=a.negative_rule,
                                          threshold=a.reward_threshold, w_lambda=a.w_reinforce_lambda)
                 for o in phase.objectives}
        weights = {o.name: o.weight for o in phase.objectives}
        norms = obj.token_normalisers(terms, resp_lens)

        # 5. pack only the rows some loss term uses (zero-advantage samples add nothing to the loss)
        need = {"cond": torch.zeros(B, dtype=torch.bool), "free": torch.zeros(B, dtype=torch.bool)}
        for name, t in terms.items():
            need[t.view] |= t.mask & (t.advantage != 0)
        use_kl = a.kl_coef > 0 and self.ref_model is not None and any(t.view == "cond" for t in terms.values())
        if use_kl:
            need["cond"] |= True
        if cfg.logging.view_gap:
            both = need["cond"] | need["free"]
            need["cond"], need["free"] = both.clone(), both.clone()
        batch = pack(roll.prompt_ids, roll.response_ids, cond=need["cond"].tolist(), free=need["free"].tolist(),
                     empty_token=self.empty_token, max_tokens=cfg.optim.max_tokens_per_microbatch)
        R = batch.rows.numel()

        # per-row coefficients of the step loss (see objectives.py for the exact definition)
        rs, rv = batch.row_sample, batch.row_view
        row_terms = []
        for name, t in terms.items():
            vid = 0 if t.view == "cond" else 1
            coef = torch.where((rv == vid) & t.mask[rs], torch.tensor(weights[name] / max(norms[name], 1)),
                               torch.tensor(0.0))
            row_terms.append((name, coef, t.advantage[rs]))
        # the sampler's log-prob of each packed row's token (old log-probs under "rollout", and the gap metric)
        beh_rows = torch.tensor([roll.behaviour_logp[s][p] for s, p in zip(rs.tolist(), batch.row_pos.tolist())],
                                dtype=torch.float32)
        old_rows = beh_rows if a.old_logp == "rollout" else None
        ref_rows = self._reference_logp(batch) if use_kl else None
        kl_coef_row = torch.where(rv == 0, torch.tensor(a.kl_coef / max(int(resp_lens.sum()), 1)), torch.tensor(0.0))
        stash = torch.zeros(R)
        term_sums = {name: torch.zeros(()) for name, _, _ in row_terms}

        def loss_rows(lp: torch.Tensor, ridx: torch.Tensor) -> torch.Tensor:
            """Per-token loss of rows ridx (indices into the packed rows)."""
            ridx = ridx.cpu()
            stash[ridx] = lp.detach().cpu()
            old = lp.detach() if old_rows is None else torch.where(rv[ridx].to(lp.device) == 0,
                                                                   old_rows[ridx].to(lp.device), lp.detach())
            total = torch.zeros_like(lp)
            if a.tis_cap > 0:  # truncated importance weights of the cond rows (objectives.py)
                w = torch.where(rv[ridx].to(lp.device) == 0,
                                obj.tis_weight(lp, beh_rows[ridx].to(lp.device), a.tis_cap), torch.ones_like(lp))
            for name, coef, adv in row_terms:
                c = coef[ridx].to(lp.device) if a.tis_cap <= 0 else coef[ridx].to(lp.device) * w
                term = c * obj.policy_loss(lp, old, adv[ridx].to(lp.device), eps_low=a.clip_eps_low,
                                           eps_high=a.clip_eps_high, dual_clip_c=a.dual_clip_c)
                term_sums[name] += term.detach().sum().cpu()
                total = total + term
            if ref_rows is not None:
                total = total + kl_coef_row[ridx].to(lp.device) * obj.k3_kl(lp, ref_rows[ridx].to(lp.device))
            return total

        # 6-8. one forward per bin (micro-batch) over the packed stream, fused log-prob + loss, backward
        self.model.train()
        loss_total, entropy = backward_packed(self.model, batch, loss_rows, temperature=cfg.rollout.temperature,
                                              impl=cfg.model.logprob_impl, with_entropy=cfg.logging.entropy)
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(),
                                                   cfg.optim.grad_clip if cfg.optim.grad_clip > 0 else float("inf"))
        if not (math.isfinite(loss_total) and math.isfinite(float(grad_norm))):
            self.optimizer.zero_grad(set_to_none=True)
            what = "non-finite loss" if not math.isfinite(loss_total) else "non-finite gradient norm"
            raise NonFiniteError(self._stop_message(_batch_report(
                self.step, phase.name, what, terms=terms, rows=R, bins=len(batch.bins), loss=loss_total,
                grad_norm=float(grad_norm), **report)))
        if R > 0:
            self.optimizer.step()
            self.scheduler.step()
            if hasattr(self.rollout, "sync_weights"):   # an engine with its own copy of the weights (vllm)
                self.rollout.sync_weights(self.model)
        self.optimizer.zero_grad(set_to_none=True)
        t_end = time.perf_counter()

        # 10. metrics
        groups = rewards.view(-1, G)
        gmin, gmax = groups.min(1).values, groups.max(1).values
        m = {
            "reward/mean": rewards.mean().item(),
            "reward/accuracy": sum(correct) / B,
            "reward/format": sum(has_answer) / B,
            "rollout/response_len_mean": resp_lens.float().mean().item(),
            "rollout/truncated_frac": sum(roll.truncated) / B,
            "groups/zero_adv_frac": (gmin == gmax).float().mean().item(),
            "groups/all_solved": int(((gmin == gmax) & (gmax > 0)).sum()),
            "groups/none_solved": int(((gmin == gmax) & (gmax <= 0)).sum()),
            "loss/policy": loss_total,
            "train/grad_norm": float(grad_norm),
            "train/rows": R,
            "train/packed_tokens": batch.num_tokens,
            "train/microbatches": len(batch.bins),
            "perf/rollout_s": t_roll - t0,
            "perf/reward_s": t_rew - t_roll,
            "perf/train_s": t_end - t_rew,
            "perf/step_s": t_end - t0,
        }
        for name, s in term_sums.items():
            m[f"loss/{name}"] = s.item()
            m[f"samples/{name}"] = int(terms[name].mask.sum())
        for vid, view in enumerate(("cond", "free")):
            sel = rv == vid
            if sel.any():
                m[f"logp/{view}_mean"] = stash[sel].mean().item()
                if entropy is not None:
                    m[f"entropy/{view}"] = entropy[sel].mean().item()
        if entropy is not None and R:
            m["train/entropy"] = entropy.mean().item()
        cond_rows = torch.nonzero(rv == 0).view(-1)
        if cond_rows.numel():
            m["rollout/logprob_gap"] = (beh_rows[cond_rows] - stash[cond_rows]).abs().mean().item()
            if a.tis_cap > 0:
                m["rollout/tis_weight_mean"] = obj.tis_weight(stash[cond_rows], beh_rows[cond_rows],
                                                              a.tis_cap).mean().item()
        if hasattr(self.rollout, "last_sync_s"):
            m["perf/weight_sync_s"] = self.rollout.last_sync_s
        if cfg.logging.view_gap and R:
            c = {(s, p): v for s, p, v in zip(rs[cond_rows].tolist(), batch.row_pos[cond_rows].tolist(),
                                               stash[cond_rows].tolist())}
            free_rows = torch.nonzero(rv == 1).view(-1)
            d = [c[(s, p)] - v for s, p, v in zip(rs[free_rows].tolist(), batch.row_pos[free_rows].tolist(),
                                                  stash[free_rows].tolist()) if (s, p) in c]
            if d:
                m["logp/cond_minus_free"] = sum(d) / len(d)
        counts = [behaviour_counts(t) for t in texts]
        for kind in ("transition", "reflection", "execution"):
            m[f"behaviour/{kind}"] = sum(c[kind] for c in counts) / B
        if cfg.logging.samples_every and self.step % cfg.logging.samples_every == 0:
            adv0 = next(iter(terms.values())).advantage
            self.metrics.log_samples(self.step, [
                {"prompt": samples[i]["prompt"], "response": texts[i], "answer": samples[i]["answer"],
                 "reward": scores[i], "advantage": float(adv0[i])} for i in range(B)])
        return m

    def _stop_message(self, report: str) -> str:
        return (f"{report}\n  newest checkpoint: {self.last_checkpoint or 'none'}; metrics of the earlier steps "
                f"are in {self.out / 'metrics.jsonl'}")

    @torch.no_grad()
    def _reference_logp(self, batch) -> torch.Tensor:
        W = lm_head_weight(self.ref_model)
        out = torch.zeros(batch.rows.numel())
        for b in range(len(batch.bins)):
            ridx = batch.bin_row_index(b)
            if ridx.numel() == 0:
                continue
            hid = bin_hidden(self.ref_model, batch, b)
            h_sel = hid.index_select(0, (batch.rows[ridx] - batch.bins[b][0]).to(hid.device))
            out[ridx] = token_logprobs_no_grad(h_sel, W, batch.targets[ridx].to(hid.device),
                                               temperature=self.cfg.rollout.temperature,
                                               impl=self.cfg.model.logprob_impl).logp.cpu()
        return out

    def save_model(self, path: Path):
        """Model and tokenizer in Hugging Face format at `path`, written to <path>.tmp and renamed into place;
        an earlier folder at `path` is renamed to <path>.old first and deleted last, so an interruption leaves
        a complete model in `path` or, between the two renames, in <path>.old."""
        path = Path(path)
        tmp, old = path.with_name(path.name + ".tmp"), path.with_name(path.name + ".old")
        shutil.rmtree(tmp, ignore_errors=True)  # left by an interrupted write
        with ckpt.quiet_hf_progress():
            self.model.save_pretrained(tmp)
        self.tok.save_pretrained(tmp)
        if path.exists():
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
        os.replace(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
