"""Config loading, validation messages, overrides, and every shipped config."""
from pathlib import Path

import pytest

from fastprerl.cli import main
from fastprerl.config import ConfigError, config_from_dict, load_config, to_toml

ROOT = Path(__file__).resolve().parents[2]
SHIPPED = sorted((ROOT / "configs").glob("*.toml"))


@pytest.mark.parametrize("path", SHIPPED, ids=[p.name for p in SHIPPED])
def test_every_shipped_config_loads_and_round_trips(path):
    cfg = load_config(path)
    assert cfg.total_steps > 0
    import tomllib
    assert config_from_dict(tomllib.loads(to_toml(cfg))) == cfg


def test_shipped_set_includes_the_documented_configs():
    names = {p.name for p in SHIPPED}
    assert {"dsrl.toml", "tiny.toml", "dsrl_qwen3_4b.toml", "dsrl_1gpu_24gb.toml"} <= names


def test_dsrl_default_schedule():
    cfg = load_config(ROOT / "configs" / "dsrl.toml")
    first, second = cfg.schedule.phases
    assert [o.name for o in first.objectives] == ["nsr_prerl"] and 10 <= first.steps <= 25
    assert first.objectives[0].weight == 0.01   # the paper's code: 0 * RL + 0.01 * L_pre during the warm-up
    assert [o.name for o in second.objectives] == ["grpo"]
    assert cfg.model.path == "builtin:smollm2-135m"


def test_overrides_apply_with_types():
    cfg = load_config(ROOT / "configs" / "tiny.toml", ["optim.lr=3e-6", "rollout.top_p=0.9",
                                                        "model.empty_token=7", "run.output_dir=x/y"])
    assert cfg.optim.lr == 3e-6 and cfg.rollout.top_p == 0.9 and cfg.model.empty_token == 7
    assert cfg.run.output_dir == "x/y"


@pytest.mark.parametrize("override, message", [
    (["optim.lrr=1e-6"], "unknown key 'optim.lrr' (did you mean 'optim.lr'?)"),
    (["optimm.lr=1e-6"], "unknown key 'optimm' (did you mean 'optim'?)"),
    (["optim.lr=-1"], "optim.lr: expected a value > 0"),
    (["optim.lr=fast"], "optim.lr: expected float"),
    (["algo.adv_norm=z"], "algo.adv_norm: expected one of ['std', 'mean']"),
    (["rollout.top_p=1.5"], "rollout.top_p: expected 0.0 < value <= 1.0"),
    (["optim.lr"], "expected key=value"),
    (["rollout.vllm_gpu_memory_utilization=0"], "rollout.vllm_gpu_memory_utilization: expected 0.0 < value <= 1.0"),
    (["rollout.vllm_gpu_memory_utilization=1.5"], "rollout.vllm_gpu_memory_utilization: expected 0.0 < value"),
    (["rollout.vllm_max_model_len=-1"], "rollout.vllm_max_model_len: expected a value >= 0"),
    (["rollout.vllm_sleep=2"], "rollout.vllm_sleep: expected bool"),
    (["algo.tis_cap=-1"], "algo.tis_cap: expected a value >= 0"),
    (["optim.offload_optimizer_state=1"], "optim.offload_optimizer_state: expected bool"),
    (["rollout.backend=sglang"], "rollout.backend: expected one of ['hf', 'vllm']"),
    # non-finite floats (TOML spells nan and inf): each would disable or break what it configures
    (["optim.grad_clip=nan"], "optim.grad_clip: expected a finite number, got nan"),
    (["algo.kl_coef=nan"], "algo.kl_coef: expected a finite number, got nan"),
    (["optim.lr=inf"], "optim.lr: expected a finite number, got inf"),
    (["optim.lr=1e400"], "optim.lr: expected a finite number, got inf"),
    (["optim.lr=1" + "0" * 400], "optim.lr: expected a finite number, got 1000"),
    (["algo.dual_clip_c=+inf"], "algo.dual_clip_c: expected a finite number, got inf"),
    (["optim.weight_decay=-inf"], "optim.weight_decay: expected a finite number, got -inf"),
    (["rollout.top_p=nan"], "rollout.top_p: expected a finite number, got nan"),
    (["optim.beta1=-0.1"], "optim.beta1: expected 0.0 <= value < 1.0, got -0.1"),
    (["optim.beta1=1"], "optim.beta1: expected 0.0 <= value < 1.0, got 1.0"),
    (["optim.beta2=1.0"], "optim.beta2: expected 0.0 <= value < 1.0, got 1.0"),
    (['schedule.phases=[{ name = "mix", objectives = [{ name = "grpo" }, { name = "nsr_prerl" }, '
      '{ name = "grpo", weight = 0.5 }] }]'],
     "schedule.phases[0].objectives: objective 'grpo' appears 2 times in phase 'mix'"),
    (['data.template="Q: {problem}"'], "data.template: expected {prompt} as the only replacement field"),
    (['data.template="Q: {prompt} {answer}"'], "data.template: expected {prompt} as the only replacement field"),
    (["data.template='{prompt} \\boxed{}'"], "data.template: expected {prompt} as the only replacement field"),
    (['data.template="{prompt"'], "data.template: expected {prompt} as the only replacement field"),
    (['data.template="{prompt.upper}"'], "data.template: expected {prompt} as the only replacement field"),
    (['data.template="no prompt"'], "data.template: expected {prompt} as the only replacement field"),
    (["data.source=data/problems.txt"], "data.source: 'data/problems.txt' looks like a local file, but local "
                                        "files must end in one of ['.jsonl', '.json', '.parquet', '.csv']"),
    (["reward.fn=mathh"], "reward.fn: expected a builtin reward (math, equation, reasoning_gym) or 'module:function', "
                          "got 'mathh'"),
    (["reward.fn=:parity_reward"], "reward.fn: expected a builtin reward"),
    (["model.empty_token=1.5"], "model.empty_token: expected one of types ['int', 'str'], got 1.5"),
    (["reward.fn=fake_rewards:"], "reward.fn: expected a builtin reward"),
    (['reward.extract=["boxed", "nonsense"]'], "reward.extract[1]: expected one of ['boxed', 'gsm8k', 'answer_is',"),
    (["reward.extract=[]"], "reward.extract: expected at least one extraction mode"),
    (["data.source=builtin:additon"], "data.source: unknown builtin 'builtin:additon'; choose one of ['builtin:addition', "
     "'builtin:equations', 'builtin:word_problems']"),
    (["model.path=./no/such/model"], "model.path: no folder at './no/such/model'; expected a local model folder"),
    (["model.path=/no/such/model"], "model.path: no folder at '/no/such/model'"),
])
def test_bad_values_name_the_key(override, message):
    with pytest.raises(ConfigError) as e:
        load_config(ROOT / "configs" / "tiny.toml", override)
    assert message in str(e.value)


def test_non_finite_floats_in_a_file_or_dict_are_rejected(tmp_path):
    p = tmp_path / "c.toml"
    p.write_text("[optim]\ngrad_clip = nan\n")
    with pytest.raises(ConfigError, match=r"^optim.grad_clip: expected a finite number, got nan$"):
        load_config(p)
    p.write_text('[[schedule.phases]]\nname = "a"\nobjectives = [{ name = "grpo", weight = -inf }]\n')
    with pytest.raises(ConfigError, match=r"schedule.phases\[0\].objectives\[0\].weight: expected a finite number"):
        load_config(p)
    with pytest.raises(ConfigError, match="algo.kl_coef: expected a finite number, got nan"):
        config_from_dict({"algo": {"kl_coef": float("nan")}})


def test_values_at_the_edge_of_the_rules_are_accepted(tmp_path):
    (tmp_path / "data_dir").mkdir()
    cfg = load_config(ROOT / "configs" / "tiny.toml", [
        "optim.beta1=0", "optim.beta2=0.0",             # AdamW allows 0 <= beta < 1
        "data.template='{prompt} \\boxed{{}}'",          # doubled braces are literal
        f"data.source={tmp_path / 'missing.jsonl'}",     # a supported file: its existence is checked when read
        "reward.fn=fake_rewards:parity_reward", "reward.extract=['last_line', 'answer_tag']",
    ])
    assert (cfg.optim.beta1, cfg.optim.beta2) == (0.0, 0.0)
    assert cfg.data.template.format(prompt="Q") == "Q \\boxed{}"
    for source in ["openai/gsm8k", "AI-MO/NuminaMath-1.5", str(tmp_path / "data_dir"), "reasoning_gym:chain_sum"]:
        assert load_config(overrides=[f"data.source={source}"]).data.source == source
    assert load_config(overrides=["reward.fn=my.pkg.rewards:score"]).reward.fn == "my.pkg.rewards:score"


def test_an_existing_file_of_another_kind_is_not_taken_for_a_hub_id(tmp_path):
    for name in ("problems.tsv", "problems"):
        (tmp_path / name).write_text("x\n")
        with pytest.raises(ConfigError, match="data.source: .* looks like a local file"):
            load_config(overrides=[f"data.source={tmp_path / name}"])


def test_every_extraction_mode_and_builtin_reward_is_accepted():
    from fastprerl.rewards import BUILTIN_REWARDS, EXTRACTORS

    modes = list(EXTRACTORS)
    assert load_config(overrides=[f"reward.extract={modes}"]).reward.extract == tuple(modes)
    for name in BUILTIN_REWARDS:
        assert load_config(overrides=[f"reward.fn={name}"]).reward.fn == name


def test_unknown_key_in_file_and_bad_objective(tmp_path):
    p = tmp_path / "c.toml"
    p.write_text("[rollout]\nsamples_per_promt = 4\n")
    with pytest.raises(ConfigError, match="did you mean 'rollout.samples_per_prompt'"):
        load_config(p)
    p.write_text('[[schedule.phases]]\nname = "a"\nsteps = 2\nobjectives = [{ name = "nsr" }]\n')
    with pytest.raises(ConfigError, match=r"schedule.phases\[0\].objectives\[0\].name: expected one of"):
        load_config(p)


def test_cli_exit_code_2_on_config_errors(tmp_path, capsys):
    assert main(["train", str(tmp_path / "missing.toml")]) == 2
    assert "config file not found" in capsys.readouterr().err
    assert main(["train", str(ROOT / "configs" / "tiny.toml"), "optim.lrr=1"]) == 2
    assert "did you mean 'optim.lr'" in capsys.readouterr().err


def test_one_gpu_24gb_config():
    cfg = load_config(ROOT / "configs" / "dsrl_1gpu_24gb.toml")
    assert cfg.rollout.backend == "vllm" and cfg.model.dtype == "bfloat16"
    assert cfg.model.gradient_checkpointing and cfg.model.logprob_impl == "triton"
    assert cfg.optim.offload_optimizer_state and cfg.rollout.vllm_sleep
    assert 0 < cfg.rollout.vllm_gpu_memory_utilization < 0.5


def test_qwen3_4b_lora_24gb_config():
    cfg = load_config(ROOT / "configs" / "dsrl_qwen3_4b_24gb.toml")
    assert cfg.model.path == "Qwen/Qwen3-4B" and cfg.model.dtype == "bfloat16"
    assert cfg.model.lora.r == 16 and cfg.model.lora.alpha == 32.0
    assert set(cfg.model.lora.target_modules) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                  "down_proj"}
    assert cfg.model.gradient_checkpointing and cfg.rollout.backend == "vllm" and cfg.rollout.vllm_sleep
    assert [p.name for p in cfg.schedule.phases] == ["nsr_prerl", "grpo"]
