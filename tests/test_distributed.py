"""torchrun + FSDP2 on the CPU (gloo): real torchrun processes, the tiny random-init Llama, one torch thread per
rank (torchrun sets OMP_NUM_THREADS=1; run.threads=1).

- parity: one step from the same weights and the same rollouts (tests/dist_worker.py) on 2 ranks and in one
  plain process gives the same loss, gradient norm and updated weights (fp32, max relative difference
  <= 1e-5) for GRPO, NSR-PreRL and a phase mixing both;
- `torchrun ... -m fastprerl train configs/tiny.toml` runs both phases, rank 0 writes metrics.jsonl once,
  final/ loads; SIGKILL after the first checkpoint, then --resume with 2 ranks (equal to the run that never
  stopped) and with 1 plain process; a complete checkpoint read at the other world size gives the same final/;
- two "nodes" on one machine (two torchrun commands, c10d rendezvous on 127.0.0.1) train together;
- SIGTERM on one rank stops both after the same step with a checkpoint; a batch that does not split is a
  config error; a rank that hangs makes the other fail with the dist.timeout_s error.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from fastprerl.metrics import reduce_rows

ROOT = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent
TINY = ROOT / "configs" / "tiny.toml"
RUN = ["reward.fn=fake_rewards:parity_reward", "run.threads=1", "reward.workers=1", "run.checkpoint_every=1",
       "run.keep_checkpoints=4", "logging.progress=false", "logging.console=false"]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]
pytestmark = pytest.mark.timeout(900)


def env():
    e = dict(os.environ, PYTHONPATH=os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]),
             OMP_NUM_THREADS="1")
    return e


def torchrun(n: int, *args) -> list:
    return TORCHRUN + ["--standalone", f"--nproc_per_node={n}", *map(str, args)]


def train_cmd(out: Path, *extra, ranks: int = 2, resume: bool = False) -> list:
    tail = ["train", str(TINY), *RUN, f"run.output_dir={out}", *extra] + (["--resume"] if resume else [])
    if ranks == 0:   # one plain process: no torchrun environment
        return [sys.executable, "-m", "fastprerl", *tail]
    return torchrun(ranks, "-m", "fastprerl", *tail)


def run(cmd, timeout=600) -> subprocess.CompletedProcess:
    p = subprocess.run(cmd, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=timeout)
    return p


def rows(out: Path) -> list:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def same_apart_from_perf(a: list, b: list) -> None:
    assert len(a) == len(b)
    for ra, rb in zip(a, b):
        assert {k: v for k, v in ra.items() if not k.startswith("perf/")} == \
               {k: v for k, v in rb.items() if not k.startswith("perf/")}


def final_weights(out: Path) -> dict:
    from safetensors.torch import load_file
    return load_file(str(out / "final" / "model.safetensors"))


def rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp(min=1e-30)).item()


# ------------------------------------------------------------------------------------------ reduction rule
def test_reduce_rows_weights_means_by_their_counts_and_sums_counts():
    a = {"reward/mean": 0.5, "loss/policy": 0.25, "train/rows": 10, "clip/grpo": 0.1, "train/grad_norm": 2.0,
         "perf/step_s": 1.0, "logp/cond_mean": -1.0}
    b = {"reward/mean": 1.0, "loss/policy": -0.5, "train/rows": 30, "clip/grpo": 0.3, "train/grad_norm": 2.0,
         "perf/step_s": 3.0}
    wa = {"reward/mean": 8, "clip/grpo": 10, "logp/cond_mean": 4}
    wb = {"reward/mean": 8, "clip/grpo": 30}
    m = reduce_rows([a, b], [wa, wb])
    assert m["reward/mean"] == pytest.approx(0.75)            # (0.5*8 + 1.0*8) / 16
    assert m["clip/grpo"] == pytest.approx(0.25)              # (0.1*10 + 0.3*30) / 40 = 10 / 40
    assert m["loss/policy"] == pytest.approx(-0.25) and m["train/rows"] == 40
    assert m["perf/step_s"] == 3.0 and m["train/grad_norm"] == 2.0
    assert m["logp/cond_mean"] == -1.0                        # only one process had cond rows


# ------------------------------------------------------------------------------------------ parity
@pytest.fixture(scope="module")
def parity(tmp_path_factory):
    base = tmp_path_factory.mktemp("parity")
    one = run([sys.executable, str(TESTS / "dist_worker.py"), str(base / "one")])
    assert one.returncode == 0, one.stderr[-3000:]
    two = run(torchrun(2, TESTS / "dist_worker.py", base / "two"))
    assert two.returncode == 0, two.stderr[-3000:]
    return base


@pytest.mark.parametrize("case", ["grpo", "nsr_prerl", "mixed"])
def test_one_step_on_two_ranks_equals_one_process(parity, case):
    one, two = torch.load(parity / "one" / f"{case}.pt"), torch.load(parity / "two" / f"{case}.pt")
    r1, r2 = one["row"], two["row"]
    assert r1["dist/world_size"] == 1 and r2["dist/world_size"] == 2
    assert r1["train/rows"] == r2["train/rows"] > 0
    for key in ("loss/policy", "train/grad_norm", "reward/mean", "train/entropy"):
        assert abs(r2[key] - r1[key]) <= 1e-5 * abs(r1[key]), (key, r1[key], r2[key])
    assert set(one["weights"]) == set(two["weights"])
    init = None
    for k, w1 in one["weights"].items():
        assert w1.dtype == torch.float32
        assert rel_diff(two["weights"][k], w1) <= 1e-5, k
    # the step changed the weights (lr 1e-4 with Adam's first step: about 1e-4 per weight)
    from fastprerl.models import load_model
    init = load_model("builtin:tiny-llama", seed=0).state_dict()
    moved = max((one["weights"][k] - init[k]).abs().max().item() for k in one["weights"])
    assert moved > 5e-5


# ------------------------------------------------------------------------------------------ the CLI
@pytest.fixture(scope="module")
def full_two(tmp_path_factory):
    """An uninterrupted 2-rank run of the tiny config."""
    out = tmp_path_factory.mktemp("full2") / "run"
    p = run(train_cmd(out))
    assert p.returncode == 0, p.stderr[-3000:]
    return out, p


def test_torchrun_tiny_runs_both_phases_writes_metrics_once_and_final_loads(full_two):
    out, p = full_two
    r = rows(out)
    assert [x["step"] for x in r] == [0, 1, 2, 3]
    assert [x["phase"] for x in r] == ["nsr_prerl", "nsr_prerl", "grpo", "grpo"]
    assert all(x["dist/world_size"] == 2 for x in r)
    assert any(x["train/rows"] > 0 for x in r)                # the parity reward gives mixed groups
    assert p.stderr.count("fastprerl: done") == 1              # rank 0 speaks
    from transformers import AutoModelForCausalLM
    m = AutoModelForCausalLM.from_pretrained(out / "final")
    w = final_weights(out)
    assert torch.equal(m.model.norm.weight, w["model.norm.weight"])
    assert (out / "checkpoints" / "step_4" / "dcp" / ".metadata").is_file()


def _kill_after_first_checkpoint(cmd, out: Path) -> None:
    p = subprocess.Popen(cmd, cwd=ROOT, env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 500
        while not (out / "checkpoints" / "step_1").is_dir():
            assert p.poll() is None, "the run ended before its first checkpoint"
            assert time.time() < deadline
            time.sleep(0.05)
    finally:   # torchrun's workers are not in its process group: kill the whole tree
        import psutil
        procs = [psutil.Process(p.pid)] + psutil.Process(p.pid).children(recursive=True)
        for proc in procs:
            proc.kill()
        psutil.wait_procs(procs, timeout=60)
        p.wait()


@pytest.fixture(scope="module")
def killed_two(tmp_path_factory):
    out = tmp_path_factory.mktemp("killed2") / "run"
    _kill_after_first_checkpoint(train_cmd(out), out)
    assert len(rows(out)) < 4
    return out


def test_sigkill_then_resume_with_two_ranks_equals_the_run_that_never_stopped(full_two, killed_two, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(killed_two, out)
    p = run(train_cmd(out, resume=True))
    assert p.returncode == 0, p.stderr[-3000:]
    same_apart_from_perf(rows(out), rows(full_two[0]))
    a, b = final_weights(out), final_weights(full_two[0])
    assert all(torch.equal(a[k], b[k]) for k in b)


def test_sigkill_then_resume_with_one_process(killed_two, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(killed_two, out)
    p = run(train_cmd(out, ranks=0, resume=True))
    assert p.returncode == 0, p.stderr[-3000:]
    r = rows(out)
    assert [x["step"] for x in r] == [0, 1, 2, 3]
    assert r[-1]["dist/world_size"] == 1 and r[0]["dist/world_size"] == 2
    from transformers import AutoModelForCausalLM
    AutoModelForCausalLM.from_pretrained(out / "final")


def test_a_complete_checkpoint_gives_the_same_final_at_the_other_world_size(full_two, tmp_path):
    """2 -> 1: the DCP checkpoint step_4 read by a plain process; 1 -> 2: a plain run's step_4 read by 2 ranks.
    Both runs are complete, so --resume only loads the checkpoint and writes final/ from it."""
    two = tmp_path / "two"
    shutil.copytree(full_two[0], two)
    shutil.rmtree(two / "final")
    p = run(train_cmd(two, ranks=0, resume=True))
    assert p.returncode == 0, p.stderr[-3000:]
    a, b = final_weights(two), final_weights(full_two[0])
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in b)

    one = tmp_path / "one"
    p = run(train_cmd(one, ranks=0))
    assert p.returncode == 0, p.stderr[-3000:]
    plain_final = final_weights(one)
    shutil.rmtree(one / "final")
    p = run(train_cmd(one, resume=True))
    assert p.returncode == 0, p.stderr[-3000:]
    a = final_weights(one)
    assert set(a) == set(plain_final) and all(torch.equal(a[k], plain_final[k]) for k in plain_final)


def test_two_nodes_on_one_machine_train_together(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "run"
    tail = ["-m", "fastprerl", "train", str(TINY), *RUN, f"run.output_dir={out}"]
    procs = [subprocess.Popen(TORCHRUN + ["--nnodes=2", f"--node_rank={i}", "--nproc_per_node=1",
                                          "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}",
                                          "--rdzv-id=fastprerl-test", *tail],
                              cwd=ROOT, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i in range(2)]
    results = [p.communicate(timeout=600) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [e[-2000:] for _, e in results]
    r = rows(out)
    assert [x["step"] for x in r] == [0, 1, 2, 3] and all(x["dist/world_size"] == 2 for x in r)
    from transformers import AutoModelForCausalLM
    AutoModelForCausalLM.from_pretrained(out / "final")


def test_sigterm_on_one_rank_stops_every_rank_after_the_same_step(tmp_path):
    import psutil

    from fastprerl import checkpoint as ckpt

    out = tmp_path / "run"
    p = subprocess.Popen(train_cmd(out), cwd=ROOT, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True)
    deadline = time.time() + 500
    while not (out / "checkpoints" / "step_1").is_dir():
        assert p.poll() is None and time.time() < deadline
        time.sleep(0.05)
    ranked = [c for c in psutil.Process(p.pid).children(recursive=True) if c.environ().get("RANK") == "1"]
    workers = [c for c in ranked if c.parent().environ().get("RANK") != "1"]   # not its reward workers
    assert len(workers) == 1
    workers[0].send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=600)
    assert p.returncode == 0, err[-3000:]
    r = rows(out)
    assert len(r) < 4, "the run finished before the signal took effect"
    newest = ckpt.list_checkpoints(out / "checkpoints")[0]
    assert newest[0] == len(r) and ckpt.verify(newest[1]) is None   # every rank wrote its shard of it
    assert "stopped after step" in err and not (out / "final").exists()


def test_a_batch_that_does_not_split_is_a_config_error(tmp_path):
    p = run(train_cmd(tmp_path / "run", "rollout.prompts_per_step=3"))
    assert p.returncode != 0
    assert "rollout.prompts_per_step = 3 does not split over the 2 processes" in p.stderr


def test_the_vllm_backend_is_accepted_under_torchrun_but_not_with_lora():
    """run.check_distributed: one vLLM engine per rank is built (tests/test_vllm_backend.py runs it); pushing a
    merged LoRA adapter from the shards is not, and says so naming both keys."""
    from fastprerl.config import load_config
    from fastprerl.run import check_distributed

    check_distributed(load_config(TINY, ["rollout.backend=vllm"]), 2)
    with pytest.raises(ValueError, match=r"rollout.backend = 'vllm' with model.lora.r > 0: .* \(this run is "
                                         r"under torchrun with 2 process\(es\)\)"):
        check_distributed(load_config(TINY, ["rollout.backend=vllm", "model.lora.r=8"]), 2)


def test_a_rank_that_hangs_stops_the_other_with_the_timeout_error(tmp_path):
    script = tmp_path / "hang.py"
    script.write_text(
        "import time\n"
        "from fastprerl import distributed\n"
        "d = distributed.init('cpu', 3)\n"
        "if d.rank == 1:\n"
        "    time.sleep(30)\n"
        "else:\n"
        "    try:\n"
        "        d.any(True)\n"
        "    except distributed.CollectiveTimeout as e:\n"
        "        print('TIMEOUT:', e, flush=True)\n"
        "        raise SystemExit(7)\n")
    t0 = time.time()
    p = run(torchrun(2, script), timeout=120)
    assert "TIMEOUT: a collective did not finish within dist.timeout_s = 3 s" in p.stdout, p.stderr[-2000:]
    assert p.returncode != 0 and time.time() - t0 < 60
