"""`fastprerl study`: the arms of the DSRL comparison trained over several seeds, then the report.

  arms.py     the arms (GRPO, NSR-PreRL, PSR-PreRL, PreRL, DSRL fixed and adaptive): phases and folders
  runner.py   trains, resumes or reuses every (arm, seed), measures the gradient alignment
  report.py   the markdown report, study.json and the figures, every number read from the arms' folders
"""
from .arms import ARMS, DEFAULT_SIGNAL, DSRL_ARMS, OPTIONAL_ARMS, arm_dir, arm_phases
from .report import arm_summary, collect, moving_average, paired, steps_to_reach, write_report
from .runner import arm_config, finished_arm_mismatch, parse_seeds, run_arm, run_study

__all__ = [
    "ARMS", "DEFAULT_SIGNAL", "DSRL_ARMS", "OPTIONAL_ARMS", "arm_dir", "arm_phases", "arm_summary", "collect",
    "moving_average", "paired", "steps_to_reach", "write_report", "arm_config", "finished_arm_mismatch",
    "parse_seeds", "run_arm", "run_study",
]
