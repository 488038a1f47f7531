"""Configuration: TOML -> nested frozen dataclasses. Every default lives here; unknown keys are errors.

`load_config(path, overrides)` reads a TOML file, applies dotted `key=value` overrides, validates every
field and returns a `Config`. A field's type states its allowed values (`Literal`) and numeric bounds
(`Annotated[..., Range]`, fastprerl/config_parse.py), which the parser checks. Problems raise `ConfigError`
naming the key, the expected values and, for an unknown key, the closest valid key; the CLI turns that into
exit code 2.
"""
from __future__ import annotations

import dataclasses
import json
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

from .config_checks import check_objectives
from .config_parse import NON_NEGATIVE, POSITIVE, ConfigError, Range, apply_override, build, parse_override_value
from .data import check_source, check_template
from .objectives import OBJECTIVES
from .rewards import BUILTIN_REWARDS, EXTRACT_MODES, MATH_VERIFY, USER_REWARD

__all__ = ["Config", "ConfigError", "OBJECTIVES", "load_config", "config_from_dict", "to_toml", "validate"]

# field types that carry their constraints (checked by config_parse.build): Literal = the allowed values,
# Annotated[..., Range] = a numeric bound
PositiveInt = Annotated[int, POSITIVE]              # > 0
PositiveFloat = Annotated[float, POSITIVE]          # > 0
NonNegativeInt = Annotated[int, NON_NEGATIVE]       # >= 0
NonNegativeFloat = Annotated[float, NON_NEGATIVE]   # >= 0
Share = Annotated[float, Range(0.0, "<", "<=", 1.0)]    # 0 < value <= 1 (a probability mass, a memory share)
Decay = Annotated[float, Range(0.0, "<=", "<", 1.0)]    # 0 <= value < 1 (an AdamW beta)
ObjectiveName = Literal[tuple(OBJECTIVES)]          # fastprerl/objectives.py's table, in its order
ExtractMode = Literal[EXTRACT_MODES]                # reward.extract's modes (fastprerl/rewards)
KeepOrSkip = Literal["error", "skip"]


@dataclass(frozen=True)
class RunConfig:
    output_dir: str = "runs/dsrl"
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    threads: NonNegativeInt = 0     # torch CPU threads; 0 = torch's default
    resume: bool = False            # continue from the newest complete checkpoint (the CLI's --resume)
    checkpoint_every: int = 0       # write a checkpoint every N steps (0 = only at the end)
    keep_checkpoints: int = 2       # keep the newest K checkpoints
    merge_lora: bool = False        # LoRA runs: also write <output_dir>/final_merged, the merged HF model

    def __post_init__(self):
        if self.checkpoint_every < 0:
            raise ConfigError(f"run.checkpoint_every: expected a value >= 0, got {self.checkpoint_every!r}")
        if self.keep_checkpoints < 1:
            raise ConfigError(f"run.keep_checkpoints: expected a value >= 1, got {self.keep_checkpoints!r}")


LORA_DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class LoraConfig:
    """LoRA adapters through PEFT (fastprerl/lora.py); r = 0 trains every weight (full fine-tuning)."""
    r: int = 0                      # adapter rank; 0 = off
    alpha: float = 16.0             # scale alpha / r of the adapter's product B A
    dropout: float = 0.0            # dropout on the adapter's input
    target_modules: tuple[str, ...] = LORA_DEFAULT_TARGETS   # module names (the attention and MLP projections)

    def __post_init__(self):
        if self.r < 0:
            raise ConfigError(f"model.lora.r: expected a rank >= 0 (0 = off), got {self.r!r}")
        if self.alpha <= 0:
            raise ConfigError(f"model.lora.alpha: expected a value > 0, got {self.alpha!r}")
        if not 0 <= self.dropout < 1:
            raise ConfigError(f"model.lora.dropout: expected a value in [0, 1), got {self.dropout!r}")
        if self.r > 0 and not self.target_modules:
            raise ConfigError("model.lora.target_modules: expected at least one module name when model.lora.r > 0")


@dataclass(frozen=True)
class ModelConfig:
    path: str = "builtin:smollm2-135m"
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2", "flex_attention"] = "sdpa"
    gradient_checkpointing: bool = False
    empty_token: int | str = "auto"   # id, token string, or auto (BOS, else chat turn-start)
    logprob_impl: Literal["auto", "torch", "triton", "naive"] = "auto"
    lora: LoraConfig = field(default_factory=LoraConfig)


@dataclass(frozen=True)
class DataConfig:
    source: str = "builtin:addition"    # builtin:addition | reasoning_gym:<task> | local file | hub id
    split: str = "train"
    prompt_field: str = "problem"
    answer_field: str = "answer"
    format: Literal["completion", "chat"] = "completion"
    system_prompt: str = ""
    template: str = "{prompt}"      # str.format of the prompt text; {prompt} is its only field ({{ }} for braces)
    size: PositiveInt = 10000       # generated problems for builtin / reasoning_gym sources
    digits: PositiveInt = 2         # builtin:addition operand digits
    shuffle: bool = True
    bad_rows: KeepOrSkip = "error"      # a local record that cannot be read, lacks a field or holds null
    long_prompts: KeepOrSkip = "error"  # a prompt that leaves no room for rollout.max_new_tokens in the model's
                                        # context (skip: left out, counted)


@dataclass(frozen=True)
class RolloutConfig:
    backend: Literal["hf", "vllm"] = "hf"
    prompts_per_step: PositiveInt = 8
    samples_per_prompt: PositiveInt = 4
    max_new_tokens: PositiveInt = 12
    temperature: PositiveFloat = 1.0
    top_p: Share = 1.0
    stop_at_newline: bool = False
    generation_batch_size: PositiveInt = 64  # sequences per generate() call (hf backend)
    # vllm backend (fastprerl/rollout/vllm.py): an in-process engine colocated with the trainer
    vllm_gpu_memory_utilization: Share = 0.25   # engine's share of the GPU memory (on CPU: of the RAM)
    vllm_sleep: bool = True         # free the engine's KV cache and weights between rollouts (CUDA only)
    vllm_enforce_eager: bool = False    # no CUDA graphs (less memory, slower decoding); CPU is always eager
    vllm_max_model_len: NonNegativeInt = 0  # prompt + response tokens per sequence; 0 = the model's max positions


@dataclass(frozen=True)
class RewardConfig:
    fn: str = "math"                # math | equation (builtin:equations) | reasoning_gym | module:function
    # answer extraction modes ("math"), tried in order: math-verify's own extraction by default (LaTeX and
    # plain answers, boxed first); strict formats: boxed, gsm8k, answer_is, answer_tag, last_number, last_line
    extract: tuple[ExtractMode, ...] = (MATH_VERIFY,)
    timeout: PositiveFloat = 5.0
    workers: PositiveInt = 2
    format_penalty: NonNegativeFloat = 0.0


@dataclass(frozen=True)
class AlgoConfig:
    clip_eps_low: NonNegativeFloat = 0.2
    clip_eps_high: NonNegativeFloat = 0.2
    dual_clip_c: float = 10.0
    adv_norm: Literal["std", "mean"] = "std"   # GRPO advantages
    negative_rule: Literal["group_advantage", "reward_threshold"] = "group_advantage"
    reward_threshold: float = 0.5
    w_reinforce_lambda: NonNegativeFloat = 0.1
    kl_coef: NonNegativeFloat = 0.0     # k3 KL to a reference model on log P(y|x); 0 = off
    old_logp: Literal["detached", "rollout"] = "detached"   # detached: on-policy, ratio 1; rollout: behaviour log-probs
    tis_cap: NonNegativeFloat = 0.0     # truncated importance sampling vs the sampler's log-probs; 0 = off


@dataclass(frozen=True)
class ObjectiveConfig:
    name: ObjectiveName = "grpo"
    weight: float = 1.0


@dataclass(frozen=True)
class PhaseConfig:
    name: str = "grpo"
    steps: PositiveInt = 20
    objectives: tuple[ObjectiveConfig, ...] = (ObjectiveConfig(),)


SWITCH_SIGNALS = ("logp/free_mean",)


@dataclass(frozen=True)
class AdaptiveSwitchConfig:
    """[schedule.adaptive]: the first phase ends when its signal stops falling (the rule: fastprerl/phases.py);
    schedule.phases[0].steps is then its maximum length. signal "" = off (every phase runs its steps)."""
    signal: str = ""                # "" (off) | logp/free_mean (prompt-free log-prob of the scored rows)
    min_steps: int = 5              # the phase runs at least this many steps
    window: int = 3                 # moving average over the last `window` measured steps
    patience: int = 3               # end after this many measured steps without a new minimum
    min_delta: float = 0.0          # a new minimum must be lower than the best by more than this

    def __post_init__(self):
        if self.signal and self.signal not in SWITCH_SIGNALS:
            raise ConfigError(f"schedule.adaptive.signal: expected \"\" (off) or one of {list(SWITCH_SIGNALS)}, "
                              f"got {self.signal!r}")
        for key in ("min_steps", "window", "patience"):
            if getattr(self, key) < 1:
                raise ConfigError(f"schedule.adaptive.{key}: expected a value >= 1, got {getattr(self, key)!r}")
        if self.min_delta < 0:
            raise ConfigError(f"schedule.adaptive.min_delta: expected a value >= 0, got {self.min_delta!r}")


@dataclass(frozen=True)
class ScheduleConfig:
    phases: tuple[PhaseConfig, ...] = (
        PhaseConfig(name="nsr_prerl", steps=20, objectives=(ObjectiveConfig("nsr_prerl", 1.0),)),
        PhaseConfig(name="grpo", steps=20, objectives=(ObjectiveConfig("grpo", 1.0),)),
    )
    reset_optimizer_at_switch: bool = False
    resync_reference_at_switch: bool = True
    allow_negative_weights: bool = False    # objective weights < 0 (a term pushed the other way) are errors unless set
    adaptive: AdaptiveSwitchConfig = field(default_factory=AdaptiveSwitchConfig)


@dataclass(frozen=True)
class OptimConfig:
    lr: PositiveFloat = 1e-6
    weight_decay: NonNegativeFloat = 0.01
    beta1: Decay = 0.9
    beta2: Decay = 0.999
    eps: NonNegativeFloat = 1e-8
    grad_clip: NonNegativeFloat = 1.0
    max_tokens_per_microbatch: PositiveInt = 4096
    offload_optimizer_state: bool = False   # keep AdamW's moments (and its step) on the CPU
    step_on_zero_grad: bool = True  # a step whose loss uses no rows (NSR/PSR without such samples) still steps
                                    # AdamW on an all-zero gradient (momentum, weight decay), as the paper's code


@dataclass(frozen=True)
class LoggingConfig:
    console: bool = True
    progress: bool = True
    entropy: bool = True
    view_gap: bool = False          # also score log P(y|x) vs log P(y) during pre-train-space phases
    tensorboard: bool = False
    samples_every: NonNegativeInt = 0   # write completion samples every N steps (0 = never)
    wandb: bool = False             # also log to Weights & Biases (needs `wandb`; WANDB_MODE=offline works offline)
    wandb_project: str = "fastprerl"


@dataclass(frozen=True)
class EvalConfig:
    """Periodic evaluation during training (fastprerl.evaluation.PeriodicEval): before the first step, every
    `every` steps and after the last one, on fixed problems and a fixed sampling seed."""
    every: NonNegativeInt = 0       # evaluate every N steps (0 = off)
    data: tuple[str, ...] = ()      # eval sets as `fastprerl eval --data` takes them; () = the run's data source
    n_problems: PositiveInt = 64
    k: PositiveInt = 4              # samples per problem (Avg@k, pass@k)
    temperature: PositiveFloat = 1.0
    max_new_tokens: NonNegativeInt = 0  # 0 = rollout.max_new_tokens
    seed: int = 1234                # problems drawn / generated and sampling seed (not the training stream's)
    transition_words: tuple[str, ...] = ()   # behaviour keywords; () = fastprerl.metrics.TRANSITION_WORDS
    reflection_words: tuple[str, ...] = ()   # () = fastprerl.metrics.REFLECTION_WORDS


@dataclass(frozen=True)
class DistConfig:
    """Runs under torchrun (fastprerl/distributed.py); a plain process ignores this section."""
    timeout_s: float = 600.0        # a collective that takes longer (a dead or hung rank) stops every rank
    cpu_offload: bool = False       # FSDP2's CPUOffloadPolicy: sharded weights, gradients and AdamW on the CPU

    def __post_init__(self):
        if not self.timeout_s > 0:
            raise ConfigError(f"dist.timeout_s: expected seconds > 0, got {self.timeout_s!r}")


@dataclass(frozen=True)
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    algo: AlgoConfig = field(default_factory=AlgoConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    dist: DistConfig = field(default_factory=DistConfig)

    @property
    def total_steps(self) -> int:
        return sum(p.steps for p in self.schedule.phases)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def validate(cfg: Config) -> Config:
    """Cross-field checks."""
    if not cfg.schedule.phases:
        raise ConfigError("schedule.phases: expected at least one phase")
    for i, ph in enumerate(cfg.schedule.phases):
        if not ph.objectives:
            raise ConfigError(f"schedule.phases[{i}].objectives: expected at least one objective")
        names = [o.name for o in ph.objectives]
        repeated = next((n for n in names if names.count(n) > 1), None)
        if repeated:  # the trainer keys a phase's terms by objective name: all but one would be dropped
            raise ConfigError(f"schedule.phases[{i}].objectives: objective {repeated!r} appears "
                              f"{names.count(repeated)} times in phase {ph.name!r}; expected one entry per "
                              f"objective (with the summed weight)")
    check_objectives(cfg)
    ad = cfg.schedule.adaptive
    if ad.signal:
        first = cfg.schedule.phases[0]
        if len(cfg.schedule.phases) < 2:
            raise ConfigError("schedule.adaptive.signal: an adaptive switch ends schedule.phases[0] early; expected "
                              "at least two phases")
        if ad.min_steps > first.steps:
            raise ConfigError(f"schedule.adaptive.min_steps: expected at most schedule.phases[0].steps "
                              f"({first.steps}, the phase's maximum), got {ad.min_steps}")
        if not any(OBJECTIVES[o.name].view == "free" for o in first.objectives):
            raise ConfigError(f"schedule.adaptive.signal: {ad.signal!r} is measured on prompt-free rows; "
                              f"schedule.phases[0] ({first.name!r}) has no prompt-free objective "
                              f"({', '.join(n for n, o in OBJECTIVES.items() if o.view == 'free')})")
    if cfg.algo.clip_eps_low >= 1:
        raise ConfigError(f"algo.clip_eps_low: expected a value < 1, got {cfg.algo.clip_eps_low}")
    if cfg.algo.dual_clip_c <= 1:
        raise ConfigError(f"algo.dual_clip_c: expected a value > 1, got {cfg.algo.dual_clip_c}")
    if cfg.reward.fn not in BUILTIN_REWARDS and not USER_REWARD.fullmatch(cfg.reward.fn):
        raise ConfigError(f"reward.fn: expected a builtin reward ({', '.join(BUILTIN_REWARDS)}) or "
                          f"'module:function', got {cfg.reward.fn!r}")
    if cfg.reward.fn == "math" and not cfg.reward.extract:
        raise ConfigError("reward.extract: expected at least one extraction mode for reward.fn 'math'")
    if MATH_VERIFY in cfg.reward.extract[:-1]:
        raise ConfigError(f"reward.extract: {MATH_VERIFY!r} finds an answer wherever another mode does, so it must "
                          f"be the last mode, got {list(cfg.reward.extract)}")
    if cfg.reward.format_penalty and cfg.reward.fn not in BUILTIN_REWARDS:
        raise ConfigError(f"reward.format_penalty: applies to the built-in rewards ({', '.join(BUILTIN_REWARDS)}); "
                          f"the reward function {cfg.reward.fn!r} returns its own scores, got "
                          f"{cfg.reward.format_penalty}")
    local = cfg.model.path.startswith(("/", ".", "~"))   # a hub id is "org/name"; builtins start "builtin:"
    if Path(cfg.model.path).expanduser().is_file():
        raise ConfigError(f"model.path: {cfg.model.path!r} is a file; expected a local model folder (holding "
                          f"config.json), a hub id ('org/name') or builtin:<name>")
    out = Path(cfg.run.output_dir).expanduser()
    if out.exists() and not out.is_dir():
        raise ConfigError(f"run.output_dir: {cfg.run.output_dir!r} is a file; expected a folder (new or a run's)")
    if local and not Path(cfg.model.path).expanduser().is_dir():
        raise ConfigError(f"model.path: no folder at {cfg.model.path!r}; expected a local model folder, a hub id "
                          f"('org/name') or builtin:<name>")
    try:
        check_source(cfg.data.source)
        check_template(cfg.data.template)
    except ValueError as e:  # their messages name the key
        raise ConfigError(str(e)) from None
    return cfg


def load_config(path: str | Path | None = None, overrides: list[str] = ()) -> Config:
    data: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if p.is_dir():
            raise ConfigError(f"config file {str(p)!r} is a folder; expected a TOML file, e.g. configs/tiny.toml")
        if not p.is_file():
            raise ConfigError(f"config file not found: {str(p)!r}")
        try:
            data = tomllib.loads(p.read_text(encoding="utf-8"))
        except tomllib.TOMLDecodeError as e:
            kind = f" (a {p.suffix} file; expected a TOML config)" if p.suffix not in (".toml", "") else ""
            raise ConfigError(f"{p}: invalid TOML{kind}: {e}") from None
        except UnicodeDecodeError as e:
            raise ConfigError(f"{p}: not UTF-8 text ({e.reason} at byte {e.start}); expected a TOML config") from None
        except OSError as e:
            raise ConfigError(f"{p}: cannot read the config file: {e.strerror or e}") from None
    for ov in overrides:
        if "=" not in ov:
            raise ConfigError(f"override {ov!r}: expected key=value, e.g. optim.lr=1e-6")
        k, v = ov.split("=", 1)
        apply_override(Config, data, k.strip(), parse_override_value(v.strip()))
    return validate(build(Config, data, ""))


def config_from_dict(data: dict[str, Any]) -> Config:
    return validate(build(Config, json.loads(json.dumps(data)), ""))


def to_toml(cfg: Config) -> str:
    """The resolved config as TOML (saved in the run directory)."""
    def fmt(v):
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, str):
            return json.dumps(v)
        if isinstance(v, (list, tuple)):
            return "[" + ", ".join(fmt(x) for x in v) + "]"
        return repr(v)

    d = cfg.to_dict()
    lines = []
    for section, body in d.items():
        if section == "schedule":
            continue
        lines.append(f"[{section}]")
        lines += [f"{k} = {fmt(v)}" for k, v in body.items() if not isinstance(v, dict)]
        lines.append("")
        for name, sub in ((k, v) for k, v in body.items() if isinstance(v, dict)):   # e.g. [model.lora]
            lines.append(f"[{section}.{name}]")
            lines += [f"{k} = {fmt(v)}" for k, v in sub.items()]
            lines.append("")
    sch = d["schedule"]
    lines.append("[schedule]")
    lines += [f"{k} = {fmt(v)}" for k, v in sch.items() if not isinstance(v, (dict, list, tuple))]
    lines.append("")
    lines.append("[schedule.adaptive]")
    lines += [f"{k} = {fmt(v)}" for k, v in sch["adaptive"].items()]
    lines.append("")
    for ph in sch["phases"]:
        lines.append("[[schedule.phases]]")
        lines.append(f"name = {fmt(ph['name'])}")
        lines.append(f"steps = {ph['steps']}")
        objs = ", ".join(f"{{ name = {fmt(o['name'])}, weight = {o['weight']!r} }}" for o in ph["objectives"])
        lines.append(f"objectives = [{objs}]")
        lines.append("")
    return "\n".join(lines)
