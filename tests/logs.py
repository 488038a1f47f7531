"""Shared by the logging tests: a tiny run's settings, TensorBoard scalars, PNG sizes, a metrics row."""
import struct
from pathlib import Path

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny.toml"
FAST = ["reward.fn=fake_rewards:parity_reward", "run.threads=1", "rollout.prompts_per_step=2",
        "rollout.samples_per_prompt=4", "rollout.max_new_tokens=6", "logging.console=false"]


def scalars(tb_dir: Path, tag: str):
    acc = EventAccumulator(str(tb_dir))
    acc.Reload()
    return [(e.step, e.value) for e in acc.Scalars(tag)]


def png_size(path: Path):
    head = path.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG file"
    return struct.unpack(">II", head[16:24])


def row(step, phase="a", **kw):
    return {"step": step, "phase": phase, "reward/mean": 0.1 * step, **kw}
