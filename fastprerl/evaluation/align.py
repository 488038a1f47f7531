"""Gradient alignment of the pre-train-space and post-train-space objectives.

For a rollout y sampled WITH its prompt x, compares
  g_cond = d/dtheta log P(y | x)   and   g_free = d/dtheta log P(y) := d/dtheta log P(y | e)
(e = the empty-context token, `fastprerl.models.empty_context_token`; both summed over the response tokens,
at the sampling temperature) over all trainable parameters (a LoRA run: its adapter's A and B, what the run
trains), or those whose name matches a regex:
  inner   <g_free, g_cond>                      (float64 accumulation)
  cosine  inner / (|g_free| |g_cond|)
and the per-token log-prob differences  d_t = log p(y_t | x, y_<t) - log p(y_t | e, y_<t).

How: `fastprerl.packing.pack` puts [x; y] and [e; y] of one rollout in one packed bin, one forward of the
model body (`fastprerl.passes.bins`) gives both views' hidden states, one fused `fastprerl.kernels.token_logprobs`
call gives every response token's log-prob in both views without (tokens x vocab) logits, and two
`torch.autograd.grad` calls (one per view, the graph kept for the second) give the two gradients.

The summary follows the paper's analysis (Qwen3-4B on AMC23: inner product positive for every rollout,
mean +9.23, min +0.94, max +46.18; mean cosine 0.44): mean / median / min / max inner product, fraction
negative, mean / min / max cosine, mean |d_t| over all tokens, over the first 5 response tokens and over
the rest.
"""
from __future__ import annotations

import math
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..kernels import token_logprobs
from ..metrics import text_table
from ..models import empty_context_token, lm_head_weight
from ..packing import pack
from ..passes import bins
from .data import EvalError, check_prompt_room, parse_data_spec, prepare_datasets, sample, score_samples
from .evaluator import default_out, settings_from_args, write_json
from .model import load_model_on, load_tokenizer_for, resolve_model

FIRST_TOKENS = 5


@dataclass
class Alignment:
    """One rollout's numbers."""
    inner: float              # <grad log P(y), grad log P(y|x)>
    cosine: float
    norm_cond: float          # |grad log P(y|x)|
    norm_free: float          # |grad log P(y)|
    logp_cond: float          # log P(y|x), summed over the response tokens
    logp_free: float          # log P(y)
    token_diff: list[float]   # per response token: log p(y_t|x,y_<t) - log p(y_t|e,y_<t)


def select_params(model, pattern: str | None = None) -> list[tuple[str, torch.nn.Parameter]]:
    """Trainable parameters (tied weights once), those whose name matches `pattern` (re.search) if given."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if pattern:
        try:
            rx = re.compile(pattern)
        except re.error as e:
            raise ValueError(f"--params {pattern!r}: not a valid regular expression ({e})") from None
        named = [(n, p) for n, p in named if rx.search(n)]
        if not named:
            raise ValueError(f"--params {pattern!r} matches no trainable parameter")
    if not named:
        raise ValueError("the model has no trainable parameters")
    return named


def rollout_alignment(model, prompt: Sequence[int], response: Sequence[int], *, empty_token: int,
                      params: Sequence[torch.nn.Parameter] | None = None, temperature: float = 1.0,
                      impl: str = "auto") -> Alignment:
    """Both views of one rollout in one packed forward, then one autograd.grad per view."""
    if not response:
        raise ValueError("rollout_alignment: empty response")
    if params is None:
        params = [p for _, p in select_params(model)]
    params = list(params)
    batch = pack([list(prompt)], [list(response)], cond=[True], free=[True], empty_token=empty_token,
                  max_tokens=len(prompt) + 2 * len(response) + 1)
    with torch.enable_grad():
        [(_, h, targets)] = list(bins(model, batch))   # both sequences in one bin: one forward
        logp = token_logprobs(h, lm_head_weight(model), targets, temperature=temperature, impl=impl).logp
        dev = logp.device
        # rows of one view are in response order (pack writes each sequence's rows in position order)
        lp_cond = logp[batch.view_rows["cond"].to(dev)]   # ridx = 0..R-1: one bin holds every row
        lp_free = logp[batch.view_rows["free"].to(dev)]
        g_free = torch.autograd.grad(lp_free.sum(), params, retain_graph=True, allow_unused=True)
        g_cond = torch.autograd.grad(lp_cond.sum(), params, allow_unused=True)
    inner = nf = nc = 0.0
    for a, b in zip(g_free, g_cond):
        if a is not None and b is not None:
            inner += float((a.double() * b.double()).sum())
        if a is not None:
            nf += float(a.double().pow(2).sum())
        if b is not None:
            nc += float(b.double().pow(2).sum())
    nf, nc = math.sqrt(nf), math.sqrt(nc)
    cos = inner / (nf * nc) if nf > 0 and nc > 0 else float("nan")
    d = (lp_cond.detach().double() - lp_free.detach().double()).cpu()
    return Alignment(inner=inner, cosine=cos, norm_cond=nc, norm_free=nf, logp_cond=float(lp_cond.detach().sum()),
                     logp_free=float(lp_free.detach().sum()), token_diff=d.tolist())


def summarise_alignment(rows: Sequence[Alignment], first: int = FIRST_TOKENS) -> dict:
    """The paper-style summary of many rollouts."""
    if not rows:
        return {"n": 0}
    inner = sorted(r.inner for r in rows)
    cos = [r.cosine for r in rows if math.isfinite(r.cosine)]
    diffs = [d for r in rows for d in r.token_diff]
    head = [d for r in rows for d in r.token_diff[:first]]
    tail = [d for r in rows for d in r.token_diff[first:]]
    mean = lambda xs: sum(xs) / len(xs) if xs else None
    n = len(inner)
    median = inner[n // 2] if n % 2 else (inner[n // 2 - 1] + inner[n // 2]) / 2
    return {
        "n": n,
        "inner_mean": mean(inner), "inner_median": median, "inner_min": inner[0], "inner_max": inner[-1],
        "inner_frac_negative": sum(1 for x in inner if x < 0) / n,
        "cosine_mean": mean(cos), "cosine_min": min(cos) if cos else None, "cosine_max": max(cos) if cos else None,
        "grad_norm_cond_mean": mean([r.norm_cond for r in rows]),
        "grad_norm_free_mean": mean([r.norm_free for r in rows]),
        "logp_cond_mean": mean([r.logp_cond for r in rows]),
        "logp_free_mean": mean([r.logp_free for r in rows]),
        "response_len_mean": mean([len(r.token_diff) for r in rows]),
        "token_diff_mean": mean(diffs),
        "token_abs_diff_mean": mean([abs(d) for d in diffs]),
        f"token_abs_diff_first{first}": mean([abs(d) for d in head]),
        "token_abs_diff_rest": mean([abs(d) for d in tail]),
    }


def parse_empty_token(text: str | None):
    """--empty-token: an id, a token string, or auto."""
    if text is None:
        return None
    return int(text) if text.strip().lstrip("-").isdigit() else text


def run_align(model_value: str, data_values: Sequence[str], settings, *, n: int = 50, samples_per_prompt: int = 1,
              params: str | None = None, empty_token=None, impl: str = "auto", device: str = "auto",
              dtype: str = "float32", keep_tokens: bool = True, progress=None) -> dict:
    """Samples n rollouts per dataset (ceil(n / G) prompts, G samples each), then aligns each. `settings`:
    fastprerl.evaluation.EvalSettings (its k and n_problems are replaced by G and ceil(n / G))."""
    if n < 1:
        raise EvalError(f"--n: expected >= 1, got {n}")
    if samples_per_prompt < 1:
        raise EvalError(f"--samples-per-prompt: expected >= 1, got {samples_per_prompt}")
    G = samples_per_prompt
    settings = settings.replace(k=G, n_problems=-(-n // G))
    specs = [parse_data_spec(v) for v in data_values]
    if not specs:
        raise EvalError("give at least one --data")
    resolved = resolve_model(model_value)
    tok = load_tokenizer_for(resolved.spec)
    datasets = prepare_datasets(specs, settings, tok, resolved.run_config)
    if empty_token is None:
        rc = resolved.run_config
        empty_token = rc.model.empty_token if rc is not None else "auto"
    try:
        e_id = empty_context_token(tok, empty_token)
    except ValueError as e:
        raise EvalError(f"--empty-token: {e}") from None
    model = load_model_on(resolved, dtype=dtype, seed=settings.eval.seed, device=device)
    context = getattr(model.config, "max_position_embeddings", None)
    if context:
        check_prompt_room(datasets, int(context), settings.eval.max_new_tokens)
    try:
        named = select_params(model, params)
    except ValueError as e:
        raise EvalError(str(e)) from None
    ps = [p for _, p in named]

    per, rollouts, everything = {}, [], []
    for ds in datasets:
        s = score_samples(sample(model, tok, ds, settings), ds, settings)
        rows, verdicts = [], []
        for i in range(min(n, len(s.texts))):
            y = s.response_ids[i]
            if not y:
                continue
            a = rollout_alignment(model, ds.prompt_ids[i // G], y, empty_token=e_id, params=ps,
                                  temperature=settings.eval.temperature, impl=impl)
            rows.append(a)
            verdicts.append(s.verdicts[i])
            rec = {"dataset": ds.name, "problem": i // G, "sample": i % G, "tokens": len(y),
                   "verdict": s.verdicts[i], "truncated": s.truncated[i], "inner": a.inner, "cosine": a.cosine,
                   "grad_norm_cond": a.norm_cond, "grad_norm_free": a.norm_free, "logp_cond": a.logp_cond,
                   "logp_free": a.logp_free}
            if keep_tokens:
                rec["token_diff"] = a.token_diff
            rollouts.append(rec)
            if progress is not None:
                progress(f"{ds.name}: rollout {len(rows)}/{min(n, len(s.texts))} inner {a.inner:+.4g} "
                         f"cos {a.cosine:+.3f}")
        correct = [r for r, v in zip(rows, verdicts) if v >= 1.0 - 1e-9]
        wrong = [r for r, v in zip(rows, verdicts) if v < 1.0 - 1e-9]
        per[ds.name] = {**summarise_alignment(rows),
                        "correct": summarise_alignment(correct), "wrong": summarise_alignment(wrong)}
        everything += rows
    return {
        "model": model_value,
        **resolved.report(),
        "settings": {"n": n, "samples_per_prompt": G, "temperature": settings.eval.temperature,
                     "top_p": settings.rollout.top_p, "max_new_tokens": settings.eval.max_new_tokens,
                     "format": datasets[0].data_cfg.format, "seed": settings.eval.seed, "params": params,
                     "n_param_tensors": len(named),
                     "n_param_elements": sum(p.numel() for p in ps), "dtype": dtype,
                     "empty_token": e_id, "empty_token_text": tok.convert_ids_to_tokens(e_id), "impl": impl,
                     "first_tokens": FIRST_TOKENS},
        "datasets": per,
        "overall": summarise_alignment(everything),
        "rollouts": rollouts,
    }


def format_align_table(report: dict) -> str:
    cols = ["dataset", "n", "inner mean", "min", "max", "frac<0", "cos mean", "|dlogp|", f"first{FIRST_TOKENS}",
            "rest"]
    f = lambda v, s=".4g": "-" if v is None else format(v, s)
    rows = []
    for name, r in list(report["datasets"].items()) + [("overall", report["overall"])]:
        if not r.get("n"):
            rows.append([name, "0"] + ["-"] * (len(cols) - 2))
            continue
        rows.append([name, str(r["n"]), f(r["inner_mean"]), f(r["inner_min"]), f(r["inner_max"]),
                     f(r["inner_frac_negative"], ".3f"), f(r["cosine_mean"], ".3f"), f(r["token_abs_diff_mean"], ".3f"),
                     f(r[f"token_abs_diff_first{FIRST_TOKENS}"], ".3f"), f(r["token_abs_diff_rest"], ".3f")])
    return text_table(cols, rows)


def run_align_cli(args) -> int:
    """`fastprerl align`: prints the summary table, writes the JSON report, returns the exit code."""
    try:
        settings = settings_from_args(args)
        report = run_align(args.model, args.data, settings, n=args.n, samples_per_prompt=args.samples_per_prompt,
                           params=args.params, empty_token=parse_empty_token(args.empty_token), impl=args.impl,
                           device=args.device, dtype=args.dtype, keep_tokens=not args.no_token_diffs,
                           progress=(lambda s: print(s, file=sys.stderr)) if args.verbose else None)
    except EvalError as e:
        print(f"fastprerl align: {e}", file=sys.stderr)
        return 2
    out = write_json(report, args.out or default_out(args.model, "align.json"))
    print(format_align_table(report))
    print(f"fastprerl align: report written to {out}", file=sys.stderr)
    return 0
