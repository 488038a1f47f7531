"""`fastprerl plan CONFIG [key=value ...] [--gpu-memory 24GiB] [--world-size N] [--prompt-tokens N] [--json]`.

Exit codes: 0 the plan fits --gpu-memory (or no --gpu-memory was given: no verdict); 1 it does not fit (the
message names the largest category of the peak phase, or why the rollout engine cannot start); 2 a config error
(the message of the loader `train` uses, naming the key), or no architecture for model.path.
"""
from __future__ import annotations

import sys
import time
import warnings


def run_plan_cli(args) -> int:
    from ..config import ConfigError, load_config
    from .arch import ArchitectureError
    from .report import make_plan, parse_size

    try:
        cfg = load_config(args.config, args.overrides)
        gpu = parse_size(args.gpu_memory) if args.gpu_memory else None
    except ConfigError as e:
        print(f"fastprerl: config error: {e}", file=sys.stderr)
        return 2
    except ValueError as e:
        print(f"fastprerl: {e}", file=sys.stderr)
        return 2
    if args.world_size < 1:
        print(f"fastprerl: --world-size: expected >= 1, got {args.world_size}", file=sys.stderr)
        return 2
    if args.world_size > 1 and cfg.rollout.prompts_per_step % args.world_size:
        print(f"fastprerl: config error: rollout.prompts_per_step = {cfg.rollout.prompts_per_step} does not split "
              f"over --world-size {args.world_size}", file=sys.stderr)
        return 2
    t0 = time.perf_counter()

    def progress(msg: str) -> None:
        print(f"[plan {time.perf_counter() - t0:6.1f}s] {msg}", file=sys.stderr, flush=True)

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")   # torch's module tracker warns on re-entered modules
            plan = make_plan(cfg, config_name=args.config, world_size=args.world_size, gpu_memory=gpu,
                             prompt_tokens=args.prompt_tokens, progress=progress)
    except ArchitectureError as e:
        print(f"fastprerl: config error: {e}", file=sys.stderr)
        return 2
    except ValueError as e:   # e.g. model.lora.target_modules naming no module of the architecture
        print(f"fastprerl: config error: {e}", file=sys.stderr)
        return 2
    print(plan.to_json() if args.json else plan.table())
    if plan.fits is False:
        print(f"fastprerl: {plan.verdict()}", file=sys.stderr)
        return 1
    return 0
