"""Run state: checkpoints in both formats, the run folder at start, and exact resume.

  checkpoint.py   the checkpoint folder (atomic write, manifest, verify, newest valid), the plain format
                  (Hugging Face weights + optimizer.pt), RNG states, the final model
  dcp.py          the torchrun format: weights and AdamW state sharded by torch.distributed.checkpoint
  checkpointer.py one checkpointer of the objects that save themselves (state_dict / load_state_dict) and the
                  weights, in either format, read back into either kind of model; the RNG states
  resume.py       a run's start: earlier outputs set aside, which checkpoint to resume and whether the config may
"""
from .checkpoint import (
                         CONFIG_TOML,
                         DCP_METADATA,
                         ResumeError,
                         capture_rng,
                         find_latest_valid,
                         list_checkpoints,
                         load_full,
                         load_run_state,
                         restore_rng,
                         save_checkpoint,
                         save_final,
                         save_merged,
                         save_model,
                         saved_config,
                         step_dir,
                         verify,
)
from .checkpointer import Checkpointer, RNGState, load_checkpoint
from .dcp import (
                         is_fsdp,
                         load_full_into_sharded,
                         load_sharded,
                         load_weights,
                         save_final_sharded,
                         save_sharded_checkpoint,
)
from .resume import (
                         RESUME_MAY_CHANGE,
                         RUN_OUTPUTS,
                         check_resume_config,
                         config_changes,
                         prepare_output_dir,
                         resume_point,
                         set_aside_earlier_outputs,
                         start_output_dir,
)

__all__ = [
    "CONFIG_TOML", "DCP_METADATA", "ResumeError", "capture_rng", "find_latest_valid", "list_checkpoints", "load_full",
    "load_run_state", "restore_rng", "save_checkpoint", "save_final", "save_merged", "save_model", "saved_config",
    "step_dir", "verify", "is_fsdp", "load_full_into_sharded", "load_sharded", "load_weights", "save_final_sharded",
    "save_sharded_checkpoint", "Checkpointer", "RNGState", "load_checkpoint", "RESUME_MAY_CHANGE", "RUN_OUTPUTS",
    "check_resume_config", "config_changes", "prepare_output_dir", "resume_point", "set_aside_earlier_outputs",
    "start_output_dir",
]
