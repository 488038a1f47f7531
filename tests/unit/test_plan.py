"""fastprerl plan: byte counts against hand-computed ones, the plan against a real CPU step of the same config
(the honesty test), the CLI's exit codes and messages."""
from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest

from fastprerl.cli import main
from fastprerl.config import load_config
from fastprerl.plan.arch import ArchitectureError, load_architecture
from fastprerl.plan.step import plan_step

ROOT = Path(__file__).resolve().parents[2]
TINY = str(ROOT / "configs" / "tiny.toml")

# builtin:tiny-llama (models.tiny_config): vocabulary 49152, hidden 64, 2 layers, 4 heads of 16, 2 key-value
# heads, MLP 128, tied embeddings.
#   embedding 49152 x 64 = 3,145,728
#   per layer: q 64x64 = 4096, k 64x32 = 2048, v 64x32 = 2048, o 64x64 = 4096, gate 64x128 = 8192,
#              up 8192, down 8192, two RMSNorms 2 x 64 = 128  -> 36,992; two layers 73,984
#   final norm 64                                           -> 3,219,776 parameters in 20 tensors
TINY_PARAMS = 3_145_728 + 2 * 36_992 + 64
TINY_TENSORS = 1 + 2 * 9 + 1
# LoRA r = 4 on q, k, v, o, gate, up, down: r x (in + out) per module
#   q 4x128 = 512, k 4x96 = 384, v 384, o 512, gate 4x192 = 768, up 768, down 768 -> 4096 per layer, 8192
TINY_LORA = 2 * (512 + 384 + 384 + 512 + 768 + 768 + 768)


def _plan(overrides, prompt_tokens=8):
    cfg = load_config(TINY, ["run.device=cpu"] + overrides)
    arch, _ = load_architecture(cfg.model.path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return plan_step(cfg, arch, prompt_tokens=prompt_tokens, device="cpu")


def test_full_finetuning_bytes_by_hand():
    p = _plan([])
    assert p.params == TINY_PARAMS and p.trainable == TINY_PARAMS
    assert p.raw["Parameter"] == 4 * TINY_PARAMS                       # fp32 weights
    assert p.raw["Gradient"] == 4 * TINY_PARAMS                        # every weight has a gradient at the peak
    assert p.raw["Optstate"] == 2 * 4 * TINY_PARAMS + 4 * TINY_TENSORS  # AdamW's two moments + a step per tensor
    assert p.categories["fused op workspace"] >= 4 * 49152 * 64        # the LM-head gradient it forms in forward
    assert p.peak == sum(p.categories.values())


def test_bf16_bytes_by_hand():
    p = _plan(["model.dtype=bfloat16"])
    assert p.raw["Parameter"] == 2 * TINY_PARAMS
    assert p.raw["Optstate"] == 2 * 2 * TINY_PARAMS + 4 * TINY_TENSORS  # torch keeps AdamW state in the param dtype


def test_lora_bytes_by_hand():
    p = _plan(["model.lora.r=4"])
    assert p.trainable == TINY_LORA
    assert p.params == TINY_PARAMS + TINY_LORA
    assert p.raw["Gradient"] == 4 * TINY_LORA                          # only the adapters get gradients
    assert p.raw["Optstate"] == 2 * 4 * TINY_LORA + 4 * (2 * 7 * 2)    # 2 matrices x 7 modules x 2 layers


def test_offload_moves_the_optimizer_to_the_host():
    p = _plan(["optim.offload_optimizer_state=true"])
    assert p.categories["optimizer"] == 0
    assert p.host_bytes == 4 * 4 * TINY_PARAMS   # weight copy, gradient copy, two moments


def test_kl_reference_model_doubles_the_weights():
    p = _plan(["algo.kl_coef=0.1"])
    assert p.raw["Parameter"] == 2 * 4 * TINY_PARAMS


def test_fsdp_shards_the_weights():
    cfg = load_config(TINY, ["run.device=cpu"])
    arch, _ = load_architecture(cfg.model.path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        p = plan_step(cfg, arch, prompt_tokens=8, world_size=4, device="cpu")
    # AdamW state of a quarter of every parameter (FSDP2 shards dim 0 of each, padded to a multiple of 4)
    assert p.raw["OptState"] <= 2 * 4 * TINY_PARAMS / 4 + 4 * TINY_TENSORS + 2 * 4 * 64 * TINY_TENSORS
    assert p.raw["OptState"] >= 2 * 4 * TINY_PARAMS / 4


# ------------------------------------------------------------------------------------------ honesty
def _honest(config, overrides, prompt_tokens):
    from fastprerl.plan.measure import measure_real_step

    cfg = load_config(config, ["run.device=cpu"] + overrides)
    arch, _ = load_architecture(cfg.model.path)
    real = measure_real_step(cfg, prompt_tokens=prompt_tokens)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        plan = plan_step(cfg, arch, prompt_tokens=prompt_tokens, device="cpu")
    assert abs(plan.peak - real["peak"]) <= 0.15 * real["peak"], (plan.peak, real, plan.categories)
    return plan, real


def test_honest_tiny():
    _honest(TINY, [], prompt_tokens=8)


@pytest.mark.slow
def test_honest_smollm2_full_finetuning():
    _honest(str(ROOT / "configs" / "dsrl.toml"), [], prompt_tokens=16)


@pytest.mark.slow
def test_honest_smollm2_lora():
    _honest(str(ROOT / "configs" / "dsrl.toml"), ["model.lora.r=16"], prompt_tokens=16)


# ------------------------------------------------------------------------------------------ CLI
def test_cli_typo_exits_2_with_trains_message(capsys):
    assert main(["train", TINY, "optim.lrr=1"]) == 2
    train_msg = capsys.readouterr().err
    assert main(["plan", TINY, "optim.lrr=1"]) == 2
    plan_msg = capsys.readouterr().err
    assert "optim.lrr" in plan_msg and plan_msg == train_msg


def test_cli_unknown_hub_id_exits_2_naming_model_path(capsys):
    assert main(["plan", TINY, "model.path=nobody-here/no-such-model"]) == 2
    err = capsys.readouterr().err
    assert "model.path" in err and "config.json" in err


def test_cli_fits_and_json(capsys):
    assert main(["plan", TINY, "run.device=cpu", "--gpu-memory", "1GiB", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["fits"] is True and out["peak_bytes"] < 2 ** 30
    assert set(out["phases_bytes"]) == {"rollout", "training"}
    assert out["phases_bytes"]["training"]["weights"] == 4 * TINY_PARAMS + 64
    # between steps (the rollout phase) the optimizer holds its state only: two moments and a step per tensor
    assert out["phases_bytes"]["rollout"]["optimizer"] == 2 * 4 * TINY_PARAMS + 4 * TINY_TENSORS
    assert out["phases_bytes"]["rollout"]["gradients"] == 0


def test_cli_does_not_fit_exits_1_naming_the_largest_category(capsys):
    assert main(["plan", TINY, "run.device=cpu", "--gpu-memory", "50MiB"]) == 1
    err = capsys.readouterr().err
    assert "does not fit" in err and "largest category: optimizer" in err


@pytest.mark.slow
def test_cli_qwen3_4b_full_finetuning_does_not_fit_24gib(capsys):
    """Qwen3-4B trained in full in bf16 holds 7.5 GiB of weights, 7.5 of gradients and 15 of AdamW state."""
    cfg = str(ROOT / "configs" / "dsrl_qwen3_4b_24gb.toml")
    assert main(["plan", cfg, "model.lora.r=0", "optim.max_tokens_per_microbatch=1100",
                 "--gpu-memory", "24GiB"]) == 1
    err = capsys.readouterr().err
    assert "largest category: optimizer" in err


def test_shipped_architectures_load_offline():
    for spec, params_b in (("Qwen/Qwen3-4B", 4.02), ("Qwen/Qwen3-8B", 8.19), ("Qwen/Qwen2.5-1.5B-Instruct", 1.54)):
        arch, where = load_architecture(spec)
        assert where.endswith(".json")
        # parameters from the architecture, by hand: embeddings (+ untied head) + layers x (attention + MLP + norms)
        h, L, V, inter = arch.hidden_size, arch.num_hidden_layers, arch.vocab_size, arch.intermediate_size
        hd = getattr(arch, "head_dim", None) or h // arch.num_attention_heads
        q, kv = arch.num_attention_heads * hd, arch.num_key_value_heads * hd
        attn = h * q + 2 * h * kv + q * h + (q + 2 * kv if arch.model_type == "qwen2" else 2 * hd)
        n = V * h * (1 if arch.tie_word_embeddings else 2) + L * (attn + 3 * h * inter + 2 * h) + h
        assert abs(n / 1e9 - params_b) < 0.01, (spec, n)
    with pytest.raises(ArchitectureError, match="model.path"):
        load_architecture("./no-such-folder")
