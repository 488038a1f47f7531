"""Command line: `fastprerl train CONFIG [key=value ...] [--resume]`, `fastprerl plot RUN_DIR`.
No training logic here.

Exit codes: 0 done (also after a SIGINT/SIGTERM stop, which leaves a checkpoint to resume from), 2 bad config or
a run that cannot start/resume as asked, 3 a non-finite reward/loss/gradient stopped the run, 130 interrupted
before training started."""
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
    args, extra = parser.parse_known_args(argv)  # overrides may also follow --resume
    if extra and (args.command != "train" or any(e.startswith("-") for e in extra)):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if extra:
        args.overrides = list(args.overrides) + extra

    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    if args.command == "plot":
        return _plot(args)
    return _train(args)


def _plot(args) -> int:
    from .plot import plot_run

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
    from .trainer import NonFiniteError, Trainer
    try:
        trainer = Trainer(cfg)
    except (ValueError, RuntimeError) as e:
        print(f"fastprerl: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("fastprerl: interrupted before training started", file=sys.stderr)
        return 130
    try:
        status = trainer.train()
    except NonFiniteError as e:
        print(f"fastprerl: stopped: {e}", file=sys.stderr)
        return 3
    if status == "complete":
        print(f"fastprerl: done; metrics in {cfg.run.output_dir}/metrics.jsonl", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
