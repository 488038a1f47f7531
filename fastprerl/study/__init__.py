"""`fastprerl study`: the arms of the DSRL comparison trained over several seeds, then the report.

  arms.py     the arms (GRPO, NSR-PreRL, PSR-PreRL, PreRL, DSRL fixed, adaptive and with the warm-up weighted 1.0,
              NSR-RL then GRPO): phases and folders
  runner.py   trains, resumes or reuses every (arm, seed), measures the gradient alignment
  stats.py    the numbers read from the arms' folders: summaries, cells over seeds, pairs and their statistics
  report.py   the markdown report, study.json and the figures
"""
from .arms import ARMS, DEFAULT_SIGNAL, DSRL_ARMS, OPTIONAL_ARMS, arm_dir, arm_phases
from .report import write_report
from .runner import arm_config, finished_arm_mismatch, parse_seeds, run_arm, run_study
from .stats import arm_summary, bootstrap_diff, collect, moving_average, paired, sign_test, steps_to_reach

__all__ = [
    "ARMS", "DEFAULT_SIGNAL", "DSRL_ARMS", "OPTIONAL_ARMS", "arm_dir", "arm_phases", "arm_summary",
    "bootstrap_diff", "collect", "moving_average", "paired", "sign_test", "steps_to_reach", "write_report",
    "arm_config", "finished_arm_mismatch", "parse_seeds", "run_arm", "run_study",
]
