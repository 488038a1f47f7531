"""fastprerl: reinforcement learning of LLM reasoning in pre-train space (PreRL, NSR-PreRL, DSRL).

The house, drivers first (an arrow of imports points down this list, never up):
  cli.py, __main__.py   the command line; study/ (`fastprerl study`): the arms, their runs, the report
  plan/                 `fastprerl plan`: one training step on fake tensors, its peak memory by category
  trainer.py            the training loop, one step top to bottom
  evaluation/           `fastprerl eval`, `align`, `plot`, and the periodic evaluation of a run
  state/                one Checkpointer of the objects that carry a run (plain or DCP files), the run folder
                        at start, exact resume
  rollout/              sampling backends (HF generate, vLLM) behind one interface
  passes.py             the model's forwards over the packed bins and the micro-batch passes of a step
  packing.py, attention.py   the packed varlen stream and its indices; per-sequence attention
  config.py, config_parse.py, config_checks.py   TOML -> frozen dataclasses, every default, overrides,
                        config-key errors; cross-field checks of the objectives against the batch
  distributed.py        torchrun: process group, FSDP2, collectives
  models.py, lora.py, data.py, metrics.py, optim.py, phases.py, stops.py   one job each (their docstrings)
  objectives.py         every loss on (rows,) tensors, no model code
  rewards/              reward functions and the verification worker pool (no torch, no model code)
  kernels/              the fused log-prob kernels, a library of their own (fastprerl/kernels/__init__.py)
"""

__version__ = "0.1.0"
