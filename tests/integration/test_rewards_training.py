"""Two training steps with the real verifier: SmolLM2-135M-Instruct (`builtin:smollm2-135m`) in chat format on a
small local jsonl of MATH-style problems, reward "math" with its default extraction (math-verify's own), driven
through the CLI. The rewards the run logs (samples.jsonl, metrics.jsonl) must be `score_math` of the
responses it logs."""
import json

import pytest

from fastprerl.cli import main
from fastprerl.rewards import RewardPool, score_math, shutdown

PROBLEMS = [
    {"problem": "What is $2 + 3$?", "answer": "5"},
    {"problem": r"Compute $\frac{1}{2} + \frac{1}{4}$.", "answer": r"\frac{3}{4}"},
    {"problem": "What is $7 \\times 6$?", "answer": "42"},
    {"problem": r"Simplify $\sqrt{8}$.", "answer": r"2\sqrt{2}"},
]

CONFIG = """
[run]
seed = 0
threads = 1

[model]
path = "builtin:smollm2-135m"

[data]
source = "{source}"
format = "chat"
system_prompt = "Solve the problem. Put your final answer in \\\\boxed{{}}."
shuffle = false

[rollout]
prompts_per_step = 2
samples_per_prompt = 2
max_new_tokens = 24
temperature = 1.0

[reward]
fn = "math"

[optim]
lr = 1e-6

[logging]
samples_every = 1
progress = false

[[schedule.phases]]
name = "grpo"
steps = 2
objectives = [{{ name = "grpo", weight = 1.0 }}]
"""


@pytest.mark.usefixtures("one_torch_thread")
def test_two_steps_with_the_real_math_verifier(tmp_path):
    source = tmp_path / "problems.jsonl"
    source.write_text("".join(json.dumps(p) + "\n" for p in PROBLEMS))
    config = tmp_path / "math.toml"
    config.write_text(CONFIG.format(source=source))
    out = tmp_path / "run"
    assert main(["train", str(config), f"run.output_dir={out}", "logging.console=false"]) == 0

    records = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert sorted({rec["step"] for rec in records}) == [r["step"] for r in rows] == [0, 1]
    with RewardPool(workers=2) as pool:  # an independent pool: the verdicts do not depend on the run's
        results = pool.verify([rec["response"] for rec in records], [rec["answer"] for rec in records])
    assert [rec["reward"] for rec in records] == [score_math(rec["response"], rec["answer"]) for rec in records]
    shutdown()
    assert [r.score for r in results] == [rec["reward"] for rec in records]
    for row in rows:
        mine = [r for rec, r in zip(records, results) if rec["step"] == row["step"]]
        assert len(mine) == 4
        assert row["reward/mean"] == pytest.approx(sum(r.score for r in mine) / 4)
        assert row["reward/format"] == pytest.approx(sum(r.has_answer for r in mine) / 4)
    assert any(r.has_answer for r in results), "math-verify found no answer in any response"
    print("\nrewards:", [rec["reward"] for rec in records])
