"""Command line: `fastprerl train CONFIG [key=value ...]`. No training logic here."""
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
    args = parser.parse_args(argv)

    from .config import ConfigError, load_config

    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    overrides = list(args.overrides) + (["run.resume=true"] if getattr(args, "resume", False) else [])
    try:
        cfg = load_config(args.config, overrides)
    except ConfigError as e:
        print(f"fastprerl: config error: {e}", file=sys.stderr)
        return 2
    if args.command == "train":
        from .trainer import Trainer
        try:
            trainer = Trainer(cfg)
        except (ValueError, RuntimeError) as e:
            print(f"fastprerl: {e}", file=sys.stderr)
            return 2
        trainer.train()
        print(f"fastprerl: done; metrics in {cfg.run.output_dir}/metrics.jsonl", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
