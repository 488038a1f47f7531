"""The training loop, top to bottom: rollout -> reward -> advantages -> pack -> fused loss -> step."""
from __future__ import annotations

import copy
import logging
import math
import os
import random
import sys
import time
from pathlib import Path
from typing import Dict, List

import torch

from . import objectives as obj
from .config import Config, to_toml
from .data import PromptStream, format_prompt, load_problems
from .kernels import token_logprobs_no_grad, token_loss
from .metrics import MetricsLogger
from .models import empty_context_token, lm_head_weight, load_model, load_tokenizer
from .packing import bin_hidden, pack
from .rewards import get_reward_fn
from .rollout import make_backend
from .schedule import Schedule

log = logging.getLogger("fastprerl")


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("run.device = 'cuda' but no CUDA device is available")
    return torch.device(name)


def _score(reward_fn, texts: List[str], samples: List[Dict]):
    """Scores (B,) and has-answer flags (B,) from a reward function's results."""
    out = reward_fn(texts, samples)
    scores = [float(getattr(r, "score", r)) for r in out]
    has = [bool(getattr(r, "has_answer", True)) for r in out]
    return scores, has


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
        loss = token_loss(h_sel, W, tg, lambda lp, i: loss_rows(lp, ridx[i.cpu()]),
                          temperature=temperature, impl=impl)
        loss.backward()
        total += loss.item()
        if with_entropy:
            entropy[ridx] = token_logprobs_no_grad(h_sel, W, tg, temperature=temperature, with_entropy=True,
                                                   impl=impl).entropy.float().cpu()
    return total, entropy


class Trainer:
    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.out = Path(cfg.run.output_dir)
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / "config.toml").write_text(to_toml(cfg))
        if cfg.run.threads:
            torch.set_num_threads(cfg.run.threads)
        random.seed(cfg.run.seed)
        torch.manual_seed(cfg.run.seed)
        self.device = _device(cfg.run.device)

        self.tok = load_tokenizer(cfg.model.path)
        self.model = load_model(cfg.model.path, dtype=cfg.model.dtype,
                                attn_implementation=cfg.model.attn_implementation, seed=cfg.run.seed,
                                gradient_checkpointing=cfg.model.gradient_checkpointing).to(self.device)
        self.empty_token = empty_context_token(self.tok, cfg.model.empty_token)
        self.ref_model = None
        if cfg.algo.kl_coef > 0:
            self.ref_model = copy.deepcopy(self.model).eval().requires_grad_(False)

        self.schedule = Schedule(cfg.schedule)
        self.optimizer = self._make_optimizer()
        self.stream = PromptStream(load_problems(cfg.data, cfg.run.seed), cfg.run.seed, cfg.data.shuffle)
        self.rollout = make_backend(cfg.rollout, self.model, self.tok)
        self.reward_fn = _make_reward_fn(cfg.reward)
        self.metrics = MetricsLogger(self.out, tensorboard=cfg.logging.tensorboard, console=cfg.logging.console)
        self.step = 0

    def _make_optimizer(self):
        o = self.cfg.optim
        return torch.optim.AdamW([p for p in self.model.parameters() if p.requires_grad], lr=o.lr,
                                 betas=(o.beta1, o.beta2), eps=o.eps, weight_decay=o.weight_decay)

    # ------------------------------------------------------------------ the loop
    def train(self):
        total = self.schedule.total_steps
        bar = None
        if self.cfg.logging.progress:
            from tqdm import tqdm
            bar = tqdm(total=total, initial=self.step, desc="train", unit="step", file=sys.stderr,
                       dynamic_ncols=True)
        write = bar.write if bar is not None else None
        try:
            while self.step < total:
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
        finally:
            if bar is not None:
                bar.close()
            self.metrics.close()
        self.save_model(self.out / "final")

    def _switch_phase(self, phase):
        """Policy reincarnation: same weights; optionally a fresh optimizer and a re-synced reference."""
        sch = self.cfg.schedule
        if sch.reset_optimizer_at_switch:
            self.optimizer = self._make_optimizer()
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
        scores, has_answer = _score(self.reward_fn, texts, samples)
        rewards = torch.tensor(scores, dtype=torch.float32)
        resp_lens = torch.tensor([len(r) for r in roll.response_ids], dtype=torch.long)
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
        old_rows = None
        if a.old_logp == "rollout":
            old_rows = torch.tensor([roll.behaviour_logp[s][p] for s, p in zip(rs.tolist(), batch.row_pos.tolist())],
                                    dtype=torch.float32)
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
            for name, coef, adv in row_terms:
                c = coef[ridx].to(lp.device)
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
        if not math.isfinite(loss_total):
            raise FloatingPointError(f"step {self.step}: non-finite loss {loss_total} "
                                     f"(rewards mean {rewards.mean():.3f}, rows {R})")
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(),
                                                   cfg.optim.grad_clip if cfg.optim.grad_clip > 0 else float("inf"))
        if R > 0:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        t_end = time.perf_counter()

        # 10. metrics
        groups = rewards.view(-1, G)
        gmin, gmax = groups.min(1).values, groups.max(1).values
        m = {
            "reward/mean": rewards.mean().item(),
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
            beh = torch.tensor([roll.behaviour_logp[s][p] for s, p in
                                zip(rs[cond_rows].tolist(), batch.row_pos[cond_rows].tolist())])
            m["rollout/logprob_gap"] = (beh - stash[cond_rows]).abs().mean().item()
        if cfg.logging.view_gap and R:
            c = {(s, p): v for s, p, v in zip(rs[cond_rows].tolist(), batch.row_pos[cond_rows].tolist(),
                                               stash[cond_rows].tolist())}
            free_rows = torch.nonzero(rv == 1).view(-1)
            d = [c[(s, p)] - v for s, p, v in zip(rs[free_rows].tolist(), batch.row_pos[free_rows].tolist(),
                                                  stash[free_rows].tolist()) if (s, p) in c]
            if d:
                m["logp/cond_minus_free"] = sum(d) / len(d)
        if cfg.logging.samples_every and self.step % cfg.logging.samples_every == 0:
            adv0 = next(iter(terms.values())).advantage
            self.metrics.log_samples(self.step, [
                {"prompt": samples[i]["prompt"], "response": texts[i], "answer": samples[i]["answer"],
                 "reward": scores[i], "advantage": float(adv0[i])} for i in range(B)])
        return m

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
        path = Path(path)
        tmp = path.with_name(path.name + ".tmp")
        self.model.save_pretrained(tmp)
        self.tok.save_pretrained(tmp)
        if path.exists():
            import shutil
            shutil.rmtree(path)
        os.replace(tmp, path)
