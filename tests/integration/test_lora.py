"""LoRA through PEFT ([model.lora]): config checks, a frozen base with an adapter-only optimizer, both phases,
final/ loadable by PEFT itself with the trained model's log-probs, the merged model, and exact resume after
SIGKILL."""
import math
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from fastprerl.config import ConfigError, load_config
from fastprerl.kernels import token_logprobs_no_grad
from fastprerl.models import load_model
from fastprerl.packing import pack
from fastprerl.passes import bins

from runs import metric_rows as rows
from runs import run_in_process

ROOT = Path(__file__).resolve().parents[2]
TESTS = Path(__file__).resolve().parents[1]   # the support modules (fake_rewards, ...)
TINY = ROOT / "configs" / "tiny.toml"
# parity rewards (non-zero advantages), a KL reference model and the view gap: every part of the loss is live
FAST = ["model.lora.r=8", "reward.fn=fake_rewards:parity_reward", "run.threads=1", "run.checkpoint_every=1",
        "run.keep_checkpoints=4", "algo.kl_coef=0.05", "rollout.prompts_per_step=2", "rollout.samples_per_prompt=4",
        "rollout.max_new_tokens=6", "logging.console=false", "logging.view_gap=true", "optim.lr=1e-2"]


def train(run_dir, *extra):
    return run_in_process(TINY, run_dir, *extra, fast=FAST)


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("lora")
    t = train(tmp / "run", "run.merge_lora=true")
    assert t.status == "complete"
    return t, tmp / "run"


def test_config_errors_name_the_key():
    for ov, key in [("model.lora.r=-1", "model.lora.r"), ("model.lora.alpha=0", "model.lora.alpha"),
                    ("model.lora.dropout=1.0", "model.lora.dropout"), ("model.lora.rank=4", "model.lora.r")]:
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
            load_config(TINY, [ov])
    assert load_config(TINY).model.lora.r == 0   # off by default
    with pytest.raises(ValueError, match=r"model\.lora\.target_modules.*qkv"):
        load_model("builtin:tiny-llama", lora=load_config(TINY, ["model.lora.r=4",
                                                                  'model.lora.target_modules=["qkv"]']).model.lora)


def _lora_with_random_b(targets, seed=3):
    """The tiny Llama wrapped with LoRA r=4 on `targets`, every lora_B random (B = 0 would merge to the base)."""
    lora = load_config(TINY, ["model.lora.r=4", "model.lora.alpha=8",
                              f"model.lora.target_modules={targets!r}".replace("'", '"')]).model.lora
    model = load_model("builtin:tiny-llama", seed=0, lora=lora)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.copy_(0.05 * torch.randn(p.shape, generator=g))
    return model


def test_merged_weights_equal_peft_merge_and_unload():
    """lora.merged_weights (what the vLLM backend pushes) against PEFT's own merge of a copy of the model."""
    import copy

    from fastprerl.lora import lora_module_names, merged_weights
    model = _lora_with_random_b(["q_proj", "v_proj", "up_proj"])
    before = {n: t.clone() for n, t in model.state_dict().items()}
    want = copy.deepcopy(model).merge_and_unload().state_dict()
    got = list(merged_weights(model))
    assert all(torch.equal(t, before[n]) for n, t in model.state_dict().items())   # the model is unchanged
    assert [n for n, _ in got] == list(want)                 # the base model's own names, in its order
    for n, t in got:
        assert torch.equal(t, want[n]), n                    # same fp32 arithmetic as merge_and_unload
    base = load_model("builtin:tiny-llama", seed=0).state_dict()
    moved = {n for n, t in got if not torch.equal(t, base[n])}
    assert moved == {f"model.layers.{i}.{m}.weight" for i in range(2)
                     for m in ("self_attn.q_proj", "self_attn.v_proj", "mlp.up_proj")}
    assert lora_module_names(model) == [f"model.layers.{i}.{m}" for i in range(2)
                                        for m in ("self_attn.q_proj", "self_attn.v_proj", "mlp.up_proj")]
    # modules=: only the tensors under those modules, the frozen ones by reference
    part = list(merged_weights(model, modules=["model.layers.1.self_attn"]))
    assert [n for n, _ in part] == [n for n in want if n.startswith("model.layers.1.self_attn.")]
    k = dict(part)["model.layers.1.self_attn.k_proj.weight"]
    assert k.data_ptr() == model.get_base_model().model.layers[1].self_attn.k_proj.weight.data_ptr()


def test_base_is_frozen_and_only_the_adapter_trains(lora_run):
    t, run = lora_run
    trainable = {n for n, p in t.model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_A" in n or "lora_B" in n for n in trainable)
    # 2 layers x 7 projections x (A, B)
    assert len(trainable) == 2 * 7 * 2
    from fastprerl.models import lm_head_weight
    assert not lm_head_weight(t.model).requires_grad         # the fused op gets a frozen head
    opt_params = [p for g in t.optimizer.param_groups for p in g["params"]]
    assert {id(p) for p in opt_params} == {id(p) for n, p in t.model.named_parameters() if p.requires_grad}
    base = load_model("builtin:tiny-llama", seed=0)
    merged_names = {n.replace("base_model.model.", "").replace(".base_layer", ""): p
                    for n, p in t.model.named_parameters() if not p.requires_grad}
    for n, p in base.named_parameters():   # every base weight bit-identical to the untrained model's
        assert torch.equal(merged_names[n], p), n
    m = rows(run)
    assert [r["phase"] for r in m] == ["nsr_prerl"] * 2 + ["grpo"] * 2
    assert all(r["train/grad_norm"] > 0 for r in m)          # the adapter received gradients every step
    lora_b = [p for n, p in t.model.named_parameters() if "lora_B" in n]
    assert all(p.abs().sum() > 0 for p in lora_b)            # B starts at 0: training moved it


def _packed_logp(model, tok):
    ids = tok(["12+34=46", "7+8=15 and more"])["input_ids"]
    batch = pack([i[:3] for i in ids], [i[3:] for i in ids], cond=[0, 1], free=[0, 1], empty_token=1,
                 max_tokens=64)
    from fastprerl.models import lm_head_weight
    out = torch.zeros(batch.rows.numel())
    with torch.no_grad():
        for ridx, h, targets in bins(model, batch):
            out[ridx] = token_logprobs_no_grad(h, lm_head_weight(model), targets, impl="torch").logp
    return out


def test_final_loads_with_peft_and_merged_model_matches(lora_run):
    t, run = lora_run
    t.model.eval()
    want = _packed_logp(t.model, t.tok)
    loaded = PeftModel.from_pretrained(load_model("builtin:tiny-llama", seed=0), run / "final").eval()
    assert torch.equal(_packed_logp(loaded, t.tok), want)
    merged = AutoModelForCausalLM.from_pretrained(run / "final_merged").eval()
    assert not isinstance(merged, PeftModel)
    # W + s B A in float32 vs the adapter's separate product: equal up to rounding
    torch.testing.assert_close(_packed_logp(merged, t.tok), want, rtol=1e-5, atol=1e-5)
    ids = torch.tensor([t.tok("12+34=")["input_ids"]])
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, t.model(input_ids=ids).logits, rtol=1e-5, atol=1e-5)
    saved = load_file(str(run / "final" / "adapter_model.safetensors"))
    assert saved and all("lora_" in k for k in saved)        # the adapter only, not the base


def test_gradient_checkpointing_gives_the_same_run(lora_run, tmp_path):
    _, run = lora_run
    t = train(tmp_path / "gc", "model.gradient_checkpointing=true", "run.checkpoint_every=0")
    assert t.status == "complete" and t.model.base_model.model.is_gradient_checkpointing
    assert rows(tmp_path / "gc") == rows(run)


def test_sigkill_after_a_checkpoint_then_resume_is_exact(lora_run, tmp_path):
    _, ref = lora_run
    run = tmp_path / "run"
    env = {**__import__("os").environ, "PYTHONPATH": f"{TESTS}:{ROOT}"}
    cmd = [sys.executable, "-m", "fastprerl.cli", "train", str(TINY), f"run.output_dir={run}", *FAST,
           "run.merge_lora=true", "--resume"]
    log = tmp_path / "log.txt"
    with open(log, "w") as fh:
        proc = subprocess.Popen(cmd, cwd=TESTS, env=env, stdout=fh, stderr=subprocess.STDOUT)
    t0 = time.monotonic()
    try:
        while proc.poll() is None and "checkpoints/step_2" not in log.read_text():
            assert time.monotonic() - t0 < 180, log.read_text()[-3000:]
            time.sleep(0.01)
        assert proc.poll() is None, f"the run ended before the kill:\n{log.read_text()[-3000:]}"
        proc.kill()
    finally:
        proc.kill()
        proc.wait()
    from fastprerl.state.checkpoint import list_checkpoints
    done = [s for s, _ in list_checkpoints(run / "checkpoints")]
    assert done and 2 <= max(done) < 4 and not (run / "final").exists()   # killed mid-run, after step_2
    t = train(run, "run.merge_lora=true", "run.resume=true")
    assert t.status == "complete" and t.step == 4
    assert rows(run) == rows(ref)
    a = load_file(str(run / "final" / "adapter_model.safetensors"))
    b = load_file(str(ref / "final" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_eval_resolves_a_lora_run_directory_to_its_base_and_adapter(lora_run, tmp_path):
    import json
    import shutil

    from fastprerl.evaluation import model as ed
    t, run = lora_run
    r = ed.resolve_model(str(run))
    assert (r.spec, r.adapter, r.base_seed, r.run_dir) == ("builtin:tiny-llama", str(run / "final"), 0, run)
    assert r.run_config is not None and r.report() == {"resolved_model": str(run / "final"),
                                                       "lora_base_model": "builtin:tiny-llama"}
    # seed 7 for the loader: the random-init base must still be built with the run's seed (0)
    model = ed.load_model_on(r, seed=7, device="cpu")
    t.model.eval()
    assert torch.equal(_packed_logp(model, t.tok), _packed_logp(t.model, t.tok))
    assert ({n for n, p in model.named_parameters() if p.requires_grad}
            == {n for n, p in t.model.named_parameters() if p.requires_grad})     # the adapter, as in training
    # a checkpoint folder named directly: the base from the checkpoint's own run_config.toml
    ck = ed.resolve_model(str(run / "checkpoints" / "step_4"))
    assert (ck.spec, ck.adapter, ck.base_seed) == ("builtin:tiny-llama", str(run / "checkpoints" / "step_4"), 0)
    # an adapter folder away from its run: PEFT's base_model_name_or_path, else a clear error
    lone = tmp_path / "adapter"
    shutil.copytree(run / "final", lone)
    with pytest.raises(ed.EvalError, match="LoRA adapter whose base model is unknown"):
        ed.resolve_model(str(lone))
    conf = json.loads((lone / "adapter_config.json").read_text())
    (lone / "adapter_config.json").write_text(json.dumps({**conf, "base_model_name_or_path": "builtin:tiny-llama"}))
    assert ed.resolve_model(str(lone)) == ed.ResolvedModel("builtin:tiny-llama", adapter=str(lone))


def test_eval_and_align_cli_on_a_lora_run_directory(lora_run, tmp_path):
    import json

    from fastprerl.cli import main
    _, run = lora_run
    common = ["--data", "builtin:addition", "--n-problems", "3", "--max-new-tokens", "6", "--threads", "1",
              "--reward-timeout", "2"]
    assert main(["eval", str(run), *common, "--k", "2", "--out", str(tmp_path / "eval.json")]) == 0
    assert main(["eval", str(run / "final_merged"), *common, "--k", "2", "--out", str(tmp_path / "merged.json")]) == 0
    rep, merged = (json.loads((tmp_path / f).read_text()) for f in ("eval.json", "merged.json"))
    assert rep["resolved_model"] == str(run / "final") and rep["lora_base_model"] == "builtin:tiny-llama"
    # base + adapter samples what the merged model samples (their logits agree to ~1e-6, see
    # test_final_loads_with_peft_and_merged_model_matches): the same scores
    assert rep["datasets"] == merged["datasets"] and rep["datasets"]["builtin:addition"]["n_problems"] == 3
    assert main(["align", str(run), *common, "--n", "3", "--out", str(tmp_path / "align.json")]) == 0
    al = json.loads((tmp_path / "align.json").read_text())
    assert al["lora_base_model"] == "builtin:tiny-llama"
    assert al["settings"]["n_param_tensors"] == 2 * 7 * 2              # lora_A and lora_B of 2 x 7 projections
    assert len(al["rollouts"]) == 3
    assert all(r["grad_norm_cond"] > 0 and r["grad_norm_free"] > 0 and math.isfinite(r["inner"])
               for r in al["rollouts"])


def test_qwen3_4b_24gb_config_passes_the_start_checks():
    """configs/dsrl_qwen3_4b_24gb.toml (LoRA with the vLLM backend, which the start checks used to refuse)
    passes every check the trainer makes before it loads anything (the model itself cannot be downloaded
    here)."""
    from fastprerl.trainer import check_startup

    cfg = load_config(ROOT / "configs" / "dsrl_qwen3_4b_24gb.toml")
    assert cfg.model.lora.r == 16 and cfg.rollout.backend == "vllm" and cfg.rollout.vllm_sleep
    check_startup(cfg, torch.device("cuda"))   # the device the config names (run.device = "cuda")
