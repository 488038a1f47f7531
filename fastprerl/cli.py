"""Command line: `fastprerl train CONFIG [key=value ...] [--resume]`, `fastprerl plot RUN_DIR`,
`fastprerl eval MODEL_OR_RUN --data SOURCE [...]` (Avg@k, pass@k, lengths, behaviour counts; see
fastprerl/evaluation/evaluator.py), `fastprerl align MODEL_OR_RUN --data SOURCE --n 50` (gradient alignment of
log P(y) and log P(y|x); see fastprerl/evaluation/align.py), `fastprerl study` (GRPO vs NSR-PreRL vs PSR-PreRL vs
DSRL -> docs/results/; see fastprerl/study/runner.py), `fastprerl plan CONFIG [...]` (peak GPU memory of a config;
see fastprerl/plan/). No training logic here.

Exit codes of `train`: 0 done, or stopped by a SIGINT/SIGTERM after writing a checkpoint to resume from; 1 an error
during training (among them a step whose every reward failed); 2 bad input (config, data, paths) or a run that
cannot start/resume as asked; 3 a non-finite reward/loss/gradient stopped the run; 4 a second SIGINT/SIGTERM
abandoned the step in progress (no checkpoint of it); 130 interrupted before training started."""
from __future__ import annotations

import argparse
import logging
import sys


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="fastprerl", description="RL of LLM reasoning in pre-train space")
    sub = parser.add_subparsers(dest="command", required=True)
    tr = sub.add_parser("train", help="run a training job from a TOML config")
    tr.add_argument("config", help="path to a TOML config, e.g. configs/dsrl.toml")
    tr.add_argument("overrides", nargs="*", help="dotted overrides, e.g. optim.lr=1e-6 run.output_dir=runs/x")
    tr.add_argument("--resume", action="store_true", help="continue from the newest complete checkpoint")
    pl = sub.add_parser("plot", help="render a run's progress (reward, accuracy, length, entropy, behaviours)")
    pl.add_argument("run_dir", help="a run's output_dir (holding metrics.jsonl)")
    pl.add_argument("--out", default=None, help="PNG path (default: RUN_DIR/progress.png)")
    ev = sub.add_parser("eval", help="Avg@k, pass@k, response length, truncation and behaviour counts")
    _sampling_args(ev, k_default=8)
    ev.add_argument("--baseline", default=None, metavar="MODEL",
                    help="also evaluate this model on the same prompts; report behaviour-count ratios against it")
    ev.add_argument("--transition-words", default=None, metavar="W1,W2,...",
                    help="comma-separated transition keywords (default: the SEAL list in fastprerl/metrics.py)")
    ev.add_argument("--reflection-words", default=None, metavar="W1,W2,...",
                    help="comma-separated reflection keywords (default: the SEAL list in fastprerl/metrics.py)")
    ev.add_argument("--samples", default=None, metavar="PATH", help="also write every response to this JSONL")
    ev.add_argument("--out", default=None, help="JSON report path (default: RUN/eval.json or ./eval.json)")
    al = sub.add_parser("align", help="gradient alignment of log P(y) and log P(y|x) on sampled rollouts")
    _sampling_args(al, k_default=1)
    al.add_argument("--n", type=int, default=50, help="rollouts per dataset (default 50)")
    al.add_argument("--samples-per-prompt", type=int, default=1, help="rollouts per prompt (default 1)")
    al.add_argument("--params", default=None, metavar="REGEX",
                    help="only parameters whose name matches this regex (default: all trainable)")
    al.add_argument("--empty-token", default=None,
                    help="empty-context token: id, token string or auto (default: the run's, else auto)")
    al.add_argument("--impl", default="auto", choices=("auto", "torch", "triton", "naive"),
                    help="fused log-prob implementation")
    al.add_argument("--no-token-diffs", action="store_true", help="leave per-token differences out of the JSON")
    al.add_argument("--verbose", action="store_true", help="print a line per rollout")
    al.add_argument("--out", default=None, help="JSON report path (default: RUN/align.json or ./align.json)")
    st = sub.add_parser("study", help="GRPO vs NSR-PreRL vs PSR-PreRL vs DSRL (fixed / adaptive switch), "
                                      "several seeds -> a report")
    st.add_argument("overrides", nargs="*", help="dotted overrides of the base config, e.g. run.threads=1")
    st.add_argument("--config", default="configs/dsrl.toml", help="base config (default configs/dsrl.toml)")
    st.add_argument("--steps", type=int, default=40, help="steps per arm (default 40)")
    st.add_argument("--warmup", type=int, default=10, help="DSRL's NSR-PreRL steps (updates; default 10)")
    st.add_argument("--warmup-weight", type=float, default=0.01,
                    help="weight of the warm-up objective of dsrl, dsrl_adaptive, nsr_rl_grpo (default 0.01, the "
                         "paper's code; dsrl_w1 uses 1.0)")
    st.add_argument("--threshold", type=float, default=0.3,
                    help="eval Avg@k a run must reach for 'evals to threshold' in the report (default 0.3)")
    st.add_argument("--eval-every", type=int, default=10, help="evaluation interval in steps (default 10)")
    st.add_argument("--adaptive-max", type=int, default=20,
                    help="DSRL-adaptive: the most NSR-PreRL steps before the switch (default 20)")
    st.add_argument("--arms", default=None, help="comma-separated subset of grpo,nsr_prerl,psr_prerl,dsrl,"
                                                 "dsrl_adaptive (default: these five), or prerl, dsrl_w1, "
                                                 "nsr_rl_grpo")
    st.add_argument("--seeds", default=None, metavar="S1,S2,...",
                    help="run.seed of each repetition of every arm (default: the config's run.seed)")
    st.add_argument("--checkpoint-every", type=int, default=5,
                    help="checkpoint interval of every arm; a later call resumes from it (default 5)")
    st.add_argument("--title", default=None, help="the report's heading")
    st.add_argument("--align-n", type=int, default=32, help="rollouts for gradient alignment (0 = skip)")
    st.add_argument("--out", default="runs/study", help="arms' output directories (default runs/study)")
    st.add_argument("--doc", default=None, help="report path (default docs/results/<config name>.md; "
                                                "docs/RESULTS.md is the hand-written overview)")
    st.add_argument("--reading", default=None, help="a text file with the written reading of the results")
    st.add_argument("--report-only", action="store_true", help="only rebuild the report from finished arms")
    pn = sub.add_parser("plan", help="peak GPU memory of a config's rollout and training step, simulated on fake "
                                     "tensors from the model's architecture (see fastprerl/plan/)")
    pn.add_argument("config", help="path to a TOML config")
    pn.add_argument("overrides", nargs="*", help="dotted overrides, as for train")
    pn.add_argument("--gpu-memory", default=None, help="one GPU's memory, e.g. 24GiB or 80GB; exit 1 if the plan "
                                                      "does not fit")
    pn.add_argument("--world-size", type=int, default=1, help="FSDP2 ranks (default 1: one process)")
    pn.add_argument("--prompt-tokens", type=int, default=None,
                    help="prompt length (default: vllm_max_model_len - max_new_tokens, else 512)")
    pn.add_argument("--json", action="store_true", help="print the plan as JSON")
    args, extra = parser.parse_known_args(argv)  # overrides may also follow --resume
    if extra and (args.command not in ("train", "study", "plan") or any(e.startswith("-") for e in extra)):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if extra:
        args.overrides = list(args.overrides) + extra

    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    if args.command == "plot":
        return _plot(args)
    if args.command == "eval":
        from .evaluation.evaluator import run_eval_cli
        return run_eval_cli(args)
    if args.command == "align":
        from .evaluation.align import run_align_cli
        return run_align_cli(args)
    if args.command == "study":
        from .study.runner import run_study
        return run_study(args)
    if args.command == "plan":
        from .plan.cli import run_plan_cli
        return run_plan_cli(args)
    return _train(args)


def _sampling_args(p, k_default: int):
    """Options shared by eval and align: the model, the data, prompts, sampling and rewards."""
    p.add_argument("model", metavar="MODEL_OR_RUN",
                   help="builtin:*, a local Hugging Face folder, a hub id, or a run directory (its final/ model, "
                        "else its newest checkpoints/step_<N>/; a LoRA run's adapter is loaded onto its base)")
    p.add_argument("--data", action="append", required=True, metavar="SOURCE",
                   help="builtin:addition | builtin:equations | builtin:word_problems | reasoning_gym:<task> | champ | a local .jsonl/.json/.parquet/.csv with "
                        "problem/answer fields; repeat for several datasets")
    if k_default > 1:
        p.add_argument("--k", type=int, default=k_default, help=f"samples per problem (default {k_default})")
    else:
        p.set_defaults(k=1)
    p.add_argument("--n-problems", type=int, default=None,
                   help="problems per dataset (default: all of a fixed set, 100 from a generator)")
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (default 1.0)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling (default 1.0)")
    p.add_argument("--max-new-tokens", type=int, default=256, help="response length limit (default 256)")
    p.add_argument("--format", choices=("completion", "chat"), default=None,
                   help="prompt format (default: the run's, else completion)")
    p.add_argument("--template", default=None,
                   help="str.format template of the prompt text with {prompt} (default per dataset: files and "
                        "champ append a \\boxed{} instruction)")
    p.add_argument("--system-prompt", default=None, help="system prompt (default per dataset: none)")
    p.add_argument("--stop-at-newline", action=argparse.BooleanOptionalAction, default=None,
                   help="stop a response at its first newline (default: on for builtin:addition and builtin:equations)")
    p.add_argument("--reward", default=None,
                   help="math (\\boxed extraction) | last_number | equation | reasoning_gym | module:function (default: "
                        "last_number for builtin:addition, equation for builtin:equations, reasoning_gym for "
                        "reasoning_gym:*, math otherwise)")
    p.add_argument("--reward-timeout", type=float, default=5.0, help="seconds per verification (default 5)")
    p.add_argument("--digits", type=int, default=None, help="builtin:addition / builtin:equations operand digits (default 2)")
    p.add_argument("--prompt-field", default="problem", help="problem field of a local file (default problem)")
    p.add_argument("--answer-field", default="answer", help="answer field of a local file (default answer)")
    p.add_argument("--seed", type=int, default=0, help="problem subset and sampling seed (default 0)")
    p.add_argument("--generation-batch-size", type=int, default=32,
                   help="sequences per generate() call (default 32)")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (default 0: torch's default)")


def _plot(args) -> int:
    from .evaluation.plot import plot_run

    try:
        out = plot_run(args.run_dir, args.out)
    except (FileNotFoundError, ValueError) as e:
        print(f"fastprerl: {e}", file=sys.stderr)
        return 2
    print(out)
    return 0


def _train(args) -> int:
    from .config import ConfigError, load_config

    overrides = list(args.overrides) + (["run.resume=true"] if args.resume else [])
    try:
        cfg = load_config(args.config, overrides)
    except ConfigError as e:
        print(f"fastprerl: config error: {e}", file=sys.stderr)
        return 2
    from . import distributed
    try:
        return _run_training(cfg, args.config)
    finally:
        distributed.shutdown()


def _run_training(cfg, config_file=None) -> int:
    from . import distributed
    from .distributed import CollectiveTimeout
    from .stops import NonFiniteError, RewardFailure
    from .trainer import Trainer
    try:
        trainer = Trainer(cfg, config_file=config_file)
    except CollectiveTimeout as e:
        print(f"fastprerl: {e}", file=sys.stderr)
        return 1
    except (ValueError, RuntimeError, OSError) as e:
        print(f"fastprerl: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("fastprerl: interrupted before training started", file=sys.stderr)
        return 130
    try:
        status = trainer.train()   # closes the metrics sinks however it ends
    except NonFiniteError as e:
        print(f"fastprerl: stopped: {e}", file=sys.stderr)
        return 3
    except RewardFailure as e:
        print(f"fastprerl: stopped: {e}\n  newest checkpoint: {trainer.last_checkpoint or 'none'}", file=sys.stderr)
        return 1
    except Exception as e:
        if trainer.dist.enabled and distributed.is_timeout(e):
            e = CollectiveTimeout(distributed.timeout_message(cfg.dist.timeout_s, e))
        print(f"fastprerl: error at step {trainer.step}: {type(e).__name__}: {e} (newest checkpoint: "
              f"{trainer.last_checkpoint or 'none'})", file=sys.stderr)
        return 1
    finally:   # before the process group goes: a vLLM engine's shutdown destroys its groups in it
        trainer.rollout.close()
    if status == "complete" and trainer.dist.is_main:
        print(f"fastprerl: done; metrics in {cfg.run.output_dir}/metrics.jsonl", file=sys.stderr)
    return 4 if status == "abandoned" else 0


if __name__ == "__main__":
    sys.exit(main())
