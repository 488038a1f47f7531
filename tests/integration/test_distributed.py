"""torchrun + FSDP2 on the CPU (gloo): real torchrun processes, the tiny random-init Llama, one torch thread per
rank (torchrun sets OMP_NUM_THREADS=1; run.threads=1).

- parity: one step from the same weights and the same rollouts (tests/integration/dist_worker.py) on 2 ranks and in one
  plain process gives the same loss, gradient norm and updated weights (fp32, max relative difference
  <= 1e-5) for GRPO, NSR-PreRL and a phase mixing both;
- `torchrun ... -m fastprerl train configs/tiny.toml` runs both phases, rank 0 writes metrics.jsonl once,
  final/ loads; SIGKILL after the first checkpoint, then --resume with 2 ranks (equal to the run that never
  stopped) and with 1 plain process; a complete checkpoint read at the other world size gives the same final/;
- two "nodes" on one machine (two torchrun commands, c10d rendezvous on 127.0.0.1) train together;
- SIGTERM on one rank stops both after the same step with a checkpoint; a batch that does not split is a
  config error; a rank that hangs makes the other fail with the dist.timeout_s error;
- the same one-step parity for LoRA (only the adapter gets gradients and AdamW state; the fused op gets a
  frozen head), GRPO with a KL reference model and dist.cpu_offload (1 and 2 ranks); a LoRA run and a KL run
  resumed from a mid-run DCP checkpoint equal the runs that never stopped, and a plain process reads their
  checkpoints (2 -> 1); LoRA's final/ and final_merged/ are what a plain LoRA run writes; a plain LoRA
  checkpoint is refused under torchrun; periodic evaluation under torchrun equals one process's on the same
  weights; `fastprerl eval` reads a run without final/ from its DCP checkpoint.
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

ROOT = Path(__file__).resolve().parents[2]
TESTS = Path(__file__).resolve().parents[1]   # the support modules (fake_rewards, ...)
HERE = Path(__file__).resolve().parent
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
    one = run([sys.executable, str(HERE / "dist_worker.py"), str(base / "one")])
    assert one.returncode == 0, one.stderr[-3000:]
    two = run(torchrun(2, HERE / "dist_worker.py", base / "two"))
    assert two.returncode == 0, two.stderr[-3000:]
    return base


def assert_same_step(one: dict, two: dict, ranks: int = 2) -> None:
    """The same loss, gradient norm, metrics and updated weights (fp32, max relative difference <= 1e-5)."""
    r1, r2 = one["row"], two["row"]
    assert r1["dist/world_size"] == 1 and r2["dist/world_size"] == ranks
    assert r1["train/rows"] == r2["train/rows"] > 0
    for key in ("loss/policy", "train/grad_norm", "reward/mean", "train/entropy"):
        assert abs(r2[key] - r1[key]) <= 1e-5 * abs(r1[key]), (key, r1[key], r2[key])
    assert set(one["weights"]) == set(two["weights"])
    for k, w1 in one["weights"].items():
        assert w1.dtype == torch.float32
        assert rel_diff(two["weights"][k], w1) <= 1e-5, k


@pytest.mark.parametrize("case", ["grpo", "nsr_prerl", "mixed"])
def test_one_step_on_two_ranks_equals_one_process(parity, case):
    one, two = torch.load(parity / "one" / f"{case}.pt"), torch.load(parity / "two" / f"{case}.pt")
    assert_same_step(one, two)
    # the step changed the weights (lr 1e-4 with Adam's first step: about 1e-4 per weight)
    from fastprerl.models import load_model
    init = load_model("builtin:tiny-llama", seed=0).state_dict()
    moved = max((one["weights"][k] - init[k]).abs().max().item() for k in one["weights"])
    assert moved > 5e-5


# ------------------------------------------------------------------------------------------ parity: LoRA, KL, offload
@pytest.fixture(scope="module")
def parity_more(tmp_path_factory):
    """One step (tests/integration/dist_worker.py) of LoRA, of GRPO with a KL reference model and of the mixed phase with
    dist.cpu_offload, in one plain process (which has no FSDP2 and so no offload) and on 2 ranks, the offload
    case also on 1 rank."""
    base = tmp_path_factory.mktemp("parity_more")
    worker = HERE / "dist_worker.py"
    for cmd in ([sys.executable, str(worker), str(base / "one"), "grpo", "mixed", "lora", "kl"],
                torchrun(2, worker, base / "two", "lora", "kl", "offload"),
                torchrun(1, worker, base / "rank1", "offload")):
        p = run(cmd)
        assert p.returncode == 0, p.stderr[-3000:]
    return base


def case(base: Path, where: str, name: str) -> dict:
    return torch.load(base / where / f"{name}.pt")


def test_lora_step_on_two_ranks_equals_one_process_and_only_the_adapter_trains(parity_more):
    from fastprerl.config import load_config
    from fastprerl.models import load_model

    one, two = case(parity_more, "one", "lora"), case(parity_more, "two", "lora")
    assert_same_step(one, two)
    fresh = load_model("builtin:tiny-llama", seed=0,
                       lora=load_config(TINY, ["model.lora.r=4", "model.lora.alpha=8"]).model.lora)
    adapter = sorted(n for n, p in fresh.named_parameters() if p.requires_grad)
    assert adapter and all("lora_A" in n or "lora_B" in n for n in adapter)
    for res in (one, two):
        assert sorted(res["with_grad"]) == adapter        # gradients of the adapter only ...
        assert res["optim_states"] == len(adapter)        # ... and AdamW state of the adapter only
        assert res["head_requires_grad"] == [False]       # the fused op got a frozen head (no dW, no grad sweep)
    init = fresh.state_dict()
    base_keys = [k for k in two["weights"] if "lora_" not in k]
    assert base_keys and all(torch.equal(two["weights"][k], init[k]) for k in base_keys)   # the base is frozen
    assert all(two["weights"][k].abs().max() > 0 for k in adapter if "lora_B" in k)   # every B left 0


def test_kl_reference_step_on_two_ranks_equals_one_process(parity_more):
    one, two = case(parity_more, "one", "kl"), case(parity_more, "two", "kl")
    assert_same_step(one, two)
    no_kl = case(parity_more, "one", "grpo")   # the same step without the KL term: the reference counted
    assert abs(one["row"]["loss/policy"] - no_kl["row"]["loss/policy"]) > 1e-4 * abs(no_kl["row"]["loss/policy"])


@pytest.mark.parametrize("ranks", [1, 2])
def test_cpu_offload_step_equals_the_step_without_offload(parity_more, ranks):
    off = case(parity_more, "rank1" if ranks == 1 else "two", "offload")
    assert_same_step(case(parity_more, "one", "mixed"), off, ranks=ranks)


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

    from fastprerl.state import checkpoint as ckpt

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
    """run.check_distributed: one vLLM engine per rank is built (tests/integration/test_vllm_backend.py runs it); pushing a
    merged LoRA adapter from the shards is not, and says so naming both keys."""
    from fastprerl.config import load_config
    from fastprerl.distributed import check_distributed

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


# ------------------------------------------------------------------------------------------ LoRA, KL and eval runs
LORA = ["model.lora.r=4", "model.lora.alpha=8", "run.merge_lora=true"]
KL = ["algo.kl_coef=0.5"]
EVAL = ["eval.every=2", "eval.n_problems=4", "eval.k=2"]


def train_two(tmp_path_factory, name: str, *extra) -> Path:
    out = tmp_path_factory.mktemp(name) / "run"
    p = run(train_cmd(out, *extra))
    assert p.returncode == 0, p.stderr[-3000:]
    return out


def resume_from(done: Path, step: int, tmp: Path, *extra) -> Path:
    """A copy of the complete run `done` cut back to its checkpoint step_<step>, resumed with 2 ranks."""
    from fastprerl.state import checkpoint as ckpt

    out = tmp / "resumed"
    shutil.copytree(done, out)
    for name in ("final", "final_merged"):
        shutil.rmtree(out / name, ignore_errors=True)
    for s, path in ckpt.list_checkpoints(out / "checkpoints"):
        if s > step:
            shutil.rmtree(path)
    p = run(train_cmd(out, *extra, resume=True))
    assert p.returncode == 0, p.stderr[-3000:]
    assert f"resuming from {out / 'checkpoints' / f'step_{step}'}" in p.stderr
    return out


@pytest.fixture(scope="module")
def lora_two(tmp_path_factory):
    return train_two(tmp_path_factory, "lora2", *LORA)


def test_lora_run_writes_final_as_a_plain_lora_run_and_resumes_exactly(lora_two, tmp_path):
    from peft import PeftModel, get_peft_model_state_dict
    from safetensors.torch import load_file

    import fastprerl.evaluation.model as ed
    from fastprerl.models import load_model

    final = lora_two / "final"
    assert (final / "adapter_config.json").is_file() and not (final / "model.safetensors").exists()
    adapter = load_file(str(final / "adapter_model.safetensors"))
    assert adapter and all("lora_" in k for k in adapter)
    # final_merged/ is PEFT's own merge of that adapter onto the base
    ref = PeftModel.from_pretrained(load_model("builtin:tiny-llama", seed=0), final).merge_and_unload().state_dict()
    merged = load_file(str(lora_two / "final_merged" / "model.safetensors"))
    assert merged and all(torch.equal(merged[k], ref[k]) for k in merged)
    # the last DCP checkpoint holds the same adapter (read as `fastprerl eval` reads it, without a process group)
    m = ed.load_model_on(ed.resolve_model(str(lora_two / "checkpoints" / "step_4")), device="cpu")
    got = get_peft_model_state_dict(m)
    assert set(got) == set(adapter) and all(torch.equal(got[k], adapter[k]) for k in adapter)
    # resumed from step 2 with 2 ranks: the same metrics and adapter as the run that never stopped
    out = resume_from(lora_two, 2, tmp_path, *LORA)
    same_apart_from_perf(rows(out), rows(lora_two))
    again = load_file(str(out / "final" / "adapter_model.safetensors"))
    assert set(again) == set(adapter) and all(torch.equal(again[k], adapter[k]) for k in adapter)
    # 2 -> 1: one plain process reads the complete run's last DCP checkpoint and writes the same final/
    plain = tmp_path / "plain"
    shutil.copytree(lora_two, plain)
    shutil.rmtree(plain / "final")
    p = run(train_cmd(plain, *LORA, ranks=0, resume=True))
    assert p.returncode == 0, p.stderr[-3000:]
    again = load_file(str(plain / "final" / "adapter_model.safetensors"))
    assert set(again) == set(adapter) and all(torch.equal(again[k], adapter[k]) for k in adapter)


def test_plain_lora_checkpoint_is_refused_under_torchrun(tmp_path):
    out = tmp_path / "run"
    one = run(train_cmd(out, *LORA, ranks=0))
    assert one.returncode == 0, one.stderr[-3000:]
    shutil.rmtree(out / "final")
    p = run(train_cmd(out, *LORA, resume=True))
    assert p.returncode != 0
    assert "written by a plain process of a LoRA run" in p.stderr


@pytest.fixture(scope="module")
def kl_two(tmp_path_factory):
    return train_two(tmp_path_factory, "kl2", *KL)


def test_kl_reference_is_checkpointed_and_a_resume_after_the_switch_is_exact(kl_two, tmp_path, one_torch_thread):
    import torch.distributed.checkpoint as dcp

    import fastprerl.evaluation.model as ed
    from fastprerl.config import load_config
    from fastprerl.trainer import Trainer

    saved = dcp.FileSystemReader(str(kl_two / "checkpoints" / "step_3" / "dcp")).read_metadata()
    assert any(k.startswith("ref.") for k in saved.state_dict_metadata)
    # step_3 comes after the phase switch at step 2, where the reference was re-synced to the policy
    # (schedule.resync_reference_at_switch): a resume that rebuilt the step-0 reference would differ
    out = resume_from(kl_two, 3, tmp_path, *KL)
    same_apart_from_perf(rows(out), rows(kl_two))
    a, b = final_weights(out), final_weights(kl_two)
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in b)
    # 2 -> 1: a plain process reads the last DCP checkpoint, reference included: the policy after step 2
    plain = tmp_path / "plain"
    shutil.copytree(kl_two, plain)
    tr = Trainer(load_config(TINY, [*RUN, *KL, f"run.output_dir={plain}", "run.resume=true"]))
    try:
        assert tr.step == 4 and tr.root is None
        at_switch = ed.load_model_on(ed.resolve_model(str(kl_two / "checkpoints" / "step_2")), device="cpu")
        want, got = at_switch.state_dict(), tr.ref_model.state_dict()
        assert all(torch.equal(got[k], want[k]) for k in want)
        from fastprerl.models import load_model
        assert not torch.equal(got["lm_head.weight"], load_model("builtin:tiny-llama", seed=0).lm_head.weight)
    finally:
        tr.metrics.close()


@pytest.fixture(scope="module")
def eval_two(tmp_path_factory):
    return train_two(tmp_path_factory, "eval2", *EVAL)


def test_periodic_eval_under_torchrun_equals_one_process_on_the_same_weights(eval_two, tmp_path, one_torch_thread):
    """The independent reference: PeriodicEval in this plain process on the step-0 weights and on final/."""
    import fastprerl.evaluation.model as ed
    from fastprerl.config import load_config
    from fastprerl.evaluation.periodic import PeriodicEval
    from fastprerl.models import load_model, load_tokenizer
    from fastprerl.rewards import from_config

    lines = [json.loads(x) for x in (eval_two / "eval.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == [0, 2, 4]                      # written once, by rank 0
    logged = [x for x in rows(eval_two) if x["phase"] == "eval"]
    assert [x["step"] for x in logged] == [0, 2, 4] and all(x["dist/world_size"] == 2 for x in logged)
    cfg = load_config(eval_two / "config.toml")
    ev = PeriodicEval(cfg, load_tokenizer(cfg.model.path), tmp_path, run_reward_fn=from_config(cfg.reward))
    flat0 = ev.run(load_model(cfg.model.path, seed=cfg.run.seed), 0)
    final = ed.load_model_on(ed.resolve_model(str(eval_two / "final")), device="cpu")
    flat4 = ev.run(final, 4)
    mine = [json.loads(x) for x in (tmp_path / "eval.jsonl").read_text().splitlines()]
    assert mine == [lines[0], lines[2]]
    for flat, row in ((flat0, logged[0]), (flat4, logged[2])):
        assert flat == {k: v for k, v in row.items() if k.startswith("eval/")}


def test_eval_reads_a_torchrun_run_without_final_from_its_dcp_checkpoint(eval_two, tmp_path):
    import fastprerl.evaluation.model as ed

    out = tmp_path / "run"
    shutil.copytree(eval_two, out)
    shutil.rmtree(out / "final")
    r = ed.resolve_model(str(out))
    assert r.sharded == str(out / "checkpoints" / "step_4") and r.spec == "builtin:tiny-llama"
    sd = ed.load_model_on(r, device="cpu").state_dict()
    w = final_weights(eval_two)
    assert all(torch.equal(sd[k], w[k]) for k in w)
    report = tmp_path / "eval.json"
    p = run([sys.executable, "-m", "fastprerl", "eval", str(out), "--data", "builtin:addition", "--k", "1",
             "--n-problems", "2", "--max-new-tokens", "4", "--threads", "1", "--out", str(report)])
    assert p.returncode == 0, p.stderr[-3000:]
    assert json.loads(report.read_text())["resolved_model"] == str(out / "checkpoints" / "step_4")


def test_check_distributed_refuses_only_what_is_not_built():
    from fastprerl.config import load_config
    from fastprerl.distributed import check_distributed

    check_distributed(load_config(TINY, [*LORA, *KL, *EVAL, "dist.cpu_offload=true"]), 2)   # built: no error
    with pytest.raises(ValueError, match="optim.offload_optimizer_state"):   # vLLM + LoRA: the test above
        check_distributed(load_config(TINY, ["optim.offload_optimizer_state=true"]), 2)
