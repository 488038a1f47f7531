"""What an evaluation runs on: its settings, data specs, problems, prompts, and the sampling and scoring of k
responses per problem (used by `fastprerl eval`, `fastprerl align` and eval.every; the model it runs is
resolved and loaded by model.py).

Settings are the config's own dataclasses (`EvalSettings`): eval (k, n_problems, temperature,
max_new_tokens, seed, behaviour keywords), rollout (top_p, generation_batch_size, stop_at_newline), data
(format, template, system_prompt, digits, prompt_field, answer_field) and reward (fn / extract, timeout,
workers), plus the set of keys the user gave. A prompt or reward key not given takes the dataset's default
(see `prepare_datasets`).
"""
from __future__ import annotations

import dataclasses
import functools
import logging
import random
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..config import ConfigError, DataConfig, EvalConfig, RewardConfig, RolloutConfig
from ..config_parse import build
from ..data import LOCAL_FORMATS, format_prompt, problems_from_source
from ..metrics import REFLECTION_WORDS, TRANSITION_WORDS
from ..rewards import from_config, score_responses
from ..rollout.hf import HFRollout

log = logging.getLogger("fastprerl")

DEFAULT_GENERATED = 100  # problems drawn from a generator (builtin:addition, reasoning_gym:*) by default
MATH_INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."
# str.format template: the problem, then the instruction (braces of \boxed{} escaped)
MATH_TEMPLATE = "{prompt}\n\n" + MATH_INSTRUCTION.replace("{", "{{").replace("}", "}}")
REWARDS = ("math", "last_number", "equation", "reasoning_gym")
# command-line option of each settings key (error messages name the option the user typed)
OPTIONS = {"eval.k": "--k", "eval.n_problems": "--n-problems", "eval.temperature": "--temperature",
           "eval.max_new_tokens": "--max-new-tokens", "eval.seed": "--seed", "rollout.top_p": "--top-p",
           "rollout.generation_batch_size": "--generation-batch-size", "rollout.stop_at_newline": "--stop-at-newline",
           "data.format": "--format", "data.template": "--template", "data.system_prompt": "--system-prompt",
           "data.digits": "--digits", "data.prompt_field": "--prompt-field", "data.answer_field": "--answer-field",
           "reward.timeout": "--reward-timeout", "reward.workers": "--reward-workers",
           "eval.transition_words": "--transition-words", "eval.reflection_words": "--reflection-words"}


class EvalError(ValueError):
    """Bad user input for eval/align (the CLI turns it into exit code 2)."""


@dataclass(frozen=True)
class EvalSettings:
    eval: EvalConfig = EvalConfig(k=8, max_new_tokens=256, seed=0)
    rollout: RolloutConfig = RolloutConfig(generation_batch_size=32)
    data: DataConfig = DataConfig()
    reward: RewardConfig = RewardConfig()
    reward_name: str | None = None     # eval's reward name (REWARDS or module:function); None = per dataset
    given: frozenset[str] = frozenset()   # "data.*" / "rollout.stop_at_newline" keys given; others per dataset

    @classmethod
    def from_options(cls, **options) -> EvalSettings:
        """Settings from keys of OPTIONS (e.g. eval.k=4, data.template=...); a key set to None is not given.
        Values are checked by the config's own rules; an error names the command-line option."""
        options = {k: v for k, v in options.items() if v is not None}
        reward_name = options.pop("reward", None)
        sections = {"eval": {"k": 8, "max_new_tokens": 256, "seed": 0}, "rollout": {"generation_batch_size": 32},
                    "data": {}, "reward": {}}
        for key, value in options.items():
            section, name = key.split(".")
            sections[section][name] = list(value) if isinstance(value, tuple) else value
        types = {"eval": EvalConfig, "rollout": RolloutConfig, "data": DataConfig, "reward": RewardConfig}
        try:
            built = {s: build(types[s], d, s + ".") for s, d in sections.items()}
        except ConfigError as e:
            msg = str(e)
            for key, flag in OPTIONS.items():
                msg = msg.replace(key + ":", flag + ":")
            raise EvalError(msg) from None
        return cls(**built, reward_name=reward_name, given=frozenset(options))

    @property
    def n_problems(self) -> int | None:
        """None: all problems of a fixed set, DEFAULT_GENERATED from a generator."""
        return self.eval.n_problems if "eval.n_problems" in self.given else None

    def replace(self, **eval_fields) -> EvalSettings:
        """The same settings with some eval fields replaced (and given)."""
        return dataclasses.replace(self, eval=dataclasses.replace(self.eval, **eval_fields),
                                   given=self.given | {f"eval.{k}" for k in eval_fields})

    def keywords(self):
        return (tuple(w.lower() for w in self.eval.transition_words) or TRANSITION_WORDS,
                tuple(w.lower() for w in self.eval.reflection_words) or REFLECTION_WORDS)

    def report(self, fmt: str) -> dict:
        """The flat settings block of a report."""
        e, r, d, g = self.eval, self.rollout, self.data, self.given
        return {"k": e.k, "n_problems": self.n_problems, "temperature": e.temperature, "top_p": r.top_p,
                "max_new_tokens": e.max_new_tokens, "format": fmt,
                "template": d.template if "data.template" in g else None,
                "system_prompt": d.system_prompt if "data.system_prompt" in g else None,
                "stop_at_newline": r.stop_at_newline if "rollout.stop_at_newline" in g else None,
                "reward": self.reward_name, "digits": d.digits if "data.digits" in g else None,
                "prompt_field": d.prompt_field, "answer_field": d.answer_field, "seed": e.seed,
                "generation_batch_size": r.generation_batch_size, "reward_timeout": self.reward.timeout,
                "reward_workers": self.reward.workers}


# ---------------------------------------------------------------------------------------------- data
@dataclass(frozen=True)
class DataSpec:
    value: str   # as given on the command line (also the dataset's name in reports)
    kind: str    # addition | equations | word_problems | reasoning_gym | champ | file
    arg: str = ""


def parse_data_spec(value: str) -> DataSpec:
    """Checks one --data value without loading anything heavy; raises EvalError with the accepted forms."""
    forms = ("builtin:addition, builtin:equations, builtin:word_problems, reasoning_gym:<task>, champ, or a local .jsonl/.json/.parquet/.csv file "
             "with problem/answer fields")
    if value == "builtin:addition":
        return DataSpec(value, "addition")
    if value == "builtin:equations":
        return DataSpec(value, "equations")
    if value == "builtin:word_problems":
        return DataSpec(value, "word_problems")
    if value.startswith("reasoning_gym:"):
        task = value.split(":", 1)[1]
        if not task:
            raise EvalError(f"--data {value!r}: name a reasoning-gym task, e.g. reasoning_gym:chain_sum")
        return DataSpec(value, "reasoning_gym", task)
    if value == "champ":
        return DataSpec(value, "champ")
    path = Path(value)
    if path.suffix in LOCAL_FORMATS:
        if not path.is_file():
            raise EvalError(f"--data {value!r}: file not found")
        return DataSpec(value, "file", str(path))
    raise EvalError(f"--data {value!r}: unknown dataset; expected {forms}")


def champ_problems() -> list[dict]:
    """The CHAMP problems (`champ-dataset`, MIT) in natural identifier order (a fresh list of fresh dicts)."""
    return [dict(p) for p in _champ_cached()]


@functools.lru_cache(maxsize=1)
def _champ_cached():
    try:
        import champ_dataset
    except ImportError:
        raise EvalError("--data champ needs the `champ-dataset` package: pip install champ-dataset") from None
    from natsort import natsorted

    ds = champ_dataset.load("v0")
    return tuple({"prompt": ds.problems[k].text, "answer": ds.problems[k].answer, "id": k}
                 for k in natsorted(ds.problems))


def _subset(problems: list[dict], n: int | None, seed: int) -> list[dict]:
    if n is None or n >= len(problems):
        return problems
    keep = sorted(random.Random(seed).sample(range(len(problems)), n))
    return [problems[i] for i in keep]


def load_eval_problems(spec: DataSpec, n_problems: int | None, seed: int, *, digits: int = 2,
                       prompt_field: str = "problem", answer_field: str = "answer") -> list[dict]:
    """Generated sources (builtin:addition, builtin:word_problems, reasoning_gym:*): n_problems (default DEFAULT_GENERATED) problems; fixed sets: all, or a seeded
    subset (in file order) of n_problems."""
    try:
        if spec.kind == "champ":
            out = _subset(champ_problems(), n_problems, seed)
        else:
            out = problems_from_source(spec.value, n=n_problems or DEFAULT_GENERATED, seed=seed, digits=digits,
                                       prompt_field=prompt_field, answer_field=answer_field)
            if spec.kind == "file":
                out = _subset(out, n_problems, seed)
    except EvalError:
        raise
    except ValueError as e:
        raise EvalError(f"--data {spec.value!r}: {e}") from None
    if not out:
        raise EvalError(f"--data {spec.value!r}: no problems")
    return out


def default_reward(spec: DataSpec) -> str:
    return {"addition": "last_number", "equations": "equation", "reasoning_gym": "reasoning_gym"}.get(spec.kind, "math")


def reward_config(name: str, base: RewardConfig) -> RewardConfig:
    """The RewardConfig of an eval reward name: math (the default `reward.extract`: math-verify's own
    extraction, boxed answers first), last_number, reasoning_gym, or module:function; timeout and workers
    from `base`."""
    if name == "last_number":
        return dataclasses.replace(base, fn="math", extract=("last_number",), format_penalty=0.0)
    if name in ("math", "equation", "reasoning_gym") or ":" in name:
        return dataclasses.replace(base, fn=name, extract=RewardConfig().extract, format_penalty=0.0)
    raise EvalError(f"--reward {name!r}: choose one of {list(REWARDS)} or module:function")


def make_reward(name: str, base: RewardConfig):
    """The reward function of an eval reward name (`reward_config`)."""
    try:
        return from_config(reward_config(name, base))
    except ValueError as e:
        if isinstance(e, EvalError):
            raise
        raise EvalError(f"--reward: {e}") from None


# ---------------------------------------------------------------------------------------------- datasets
@dataclass
class EvalDataset:
    """One dataset, ready to sample: its problems, prompt token ids and how to score them."""
    name: str
    problems: list[dict]
    prompt_ids: list[list[int]]
    reward: str
    stop_at_newline: bool
    data_cfg: DataConfig   # used for the prompts
    seed: int              # sampling seed of this dataset


def _dataset_seed(seed: int, name: str) -> int:
    return (seed * 1_000_003 + zlib.crc32(name.encode())) % (2 ** 63)


def prepare_datasets(specs: Sequence[DataSpec], settings: EvalSettings, tokenizer,
                     run_config=None) -> list[EvalDataset]:
    """Problems, prompts and reward per dataset (same settings + seed -> the same problems and prompts).
    Defaults of what was not given: the run's format, else completion; for the dataset the run trained on,
    its template, system prompt, digits and newline stop; files, champ and builtin:word_problems append
    MATH_INSTRUCTION; newline stop for builtin:addition; the reward of `default_reward`."""
    given, d = settings.given, settings.data
    run_data = getattr(run_config, "data", None)
    fmt = d.format if "data.format" in given else (run_data.format if run_data is not None else "completion")
    out = []
    for spec in specs:
        same_as_run = run_data is not None and run_data.source == spec.value
        run_stop = getattr(getattr(run_config, "rollout", None), "stop_at_newline", None)
        digits = d.digits if "data.digits" in given else (run_data.digits if same_as_run else 2)
        problems = load_eval_problems(spec, settings.n_problems, settings.eval.seed, digits=digits,
                                      prompt_field=d.prompt_field, answer_field=d.answer_field)
        template, system = (MATH_TEMPLATE if spec.kind in ("champ", "file", "word_problems") else "{prompt}"), ""
        if same_as_run:
            template, system = run_data.template, run_data.system_prompt
        template = d.template if "data.template" in given else template
        system = d.system_prompt if "data.system_prompt" in given else system
        if "rollout.stop_at_newline" in given:
            stop = settings.rollout.stop_at_newline
        else:
            stop = run_stop if same_as_run and run_stop is not None else spec.kind in ("addition", "equations")
        dcfg = DataConfig(source=spec.value, format=fmt, template=template, system_prompt=system)
        try:
            prompts = [list(format_prompt(p, dcfg, tokenizer)) for p in problems]
            if not all(prompts):
                raise ValueError("empty prompt")
        except (KeyError, IndexError) as e:
            raise EvalError(f"--template {template!r}: cannot format a prompt ({e!r}); use {{prompt}} for the "
                            f"problem text and double other braces") from None
        except ValueError as e:
            raise EvalError(f"--data {spec.value!r}: cannot build a prompt in {fmt} format ({e})") from None
        out.append(EvalDataset(spec.value, problems, prompts, settings.reward_name or default_reward(spec),
                               bool(stop), dcfg, _dataset_seed(settings.eval.seed, spec.value)))
    return out


def check_prompt_room(datasets: Sequence[EvalDataset], context: int, max_new_tokens: int) -> None:
    """Raises EvalError when a prompt leaves no room for max_new_tokens response tokens in the model's context
    (positions), naming the dataset, the count and the longest prompt."""
    room = context - max_new_tokens
    for ds in datasets:
        long = [(len(p), i) for i, p in enumerate(ds.prompt_ids) if len(p) > room]
        if long:
            n, i = max(long)
            raise EvalError(f"--data {ds.name!r}: {len(long)} of {len(ds.prompt_ids)} prompts are longer than the "
                            f"{room} tokens the model's context of {context} leaves beside --max-new-tokens "
                            f"{max_new_tokens} (the longest: problem {i + 1}, {n} tokens); shorten them or lower "
                            f"--max-new-tokens")


# ---------------------------------------------------------------------------------------------- sampling
@dataclass
class Samples:
    """k samples per problem, problem-major: sample j of problem i is entry i * k + j."""
    k: int
    texts: list[str]
    response_ids: list[list[int]]
    truncated: list[bool]
    verdicts: list[float] = field(default_factory=list)
    has_answer: list[bool] = field(default_factory=list)
    timed_out: list[bool] = field(default_factory=list)


def sample(model, tokenizer, ds: EvalDataset, settings: EvalSettings, k: int | None = None) -> Samples:
    """k responses per prompt of `ds` with HFRollout, seeded per dataset (torch's global RNG is restored)."""
    k = k or settings.eval.k
    e = settings.eval
    rcfg = dataclasses.replace(settings.rollout, backend="hf", samples_per_prompt=k, temperature=e.temperature,
                               max_new_tokens=e.max_new_tokens or settings.rollout.max_new_tokens,
                               stop_at_newline=ds.stop_at_newline)
    roll = HFRollout(rcfg, model, tokenizer)
    devices = [model.device] if next(model.parameters()).is_cuda else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(ds.seed)
        out = roll.generate(ds.prompt_ids, k)
    texts = tokenizer.batch_decode(out.response_ids, skip_special_tokens=True)
    return Samples(k, texts, out.response_ids, list(out.truncated))


def score_samples(samples: Samples, ds: EvalDataset, settings: EvalSettings, fn=None) -> Samples:
    """Verdicts, has-answer and timeout flags of every sample; `fn` (a reward function) defaults to ds.reward's."""

    fn = fn or make_reward(ds.reward, settings.reward)
    s = score_responses(fn, samples.texts, [ds.problems[i // samples.k] for i in range(len(samples.texts))])
    samples.verdicts, samples.has_answer, samples.timed_out = s.correct, s.has_answer, s.timed_out
    return samples
