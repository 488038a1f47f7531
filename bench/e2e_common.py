"""End-to-end GRPO step benchmark, fastprerl vs TRL's GRPOTrainer: settings, the shared reward and the
two trainer workers.

Each trainer runs in its own process (`python bench/e2e_common.py --worker fastprerl|trl '<settings json>'`)
so that its memory is measured on a clean process; the worker prints one line `@@E2E_RESULT@@ {json}`.
`bench/test_e2e_trl_bench.py` starts the workers one after the other and writes the results.

What one step is, in both trainers (the same work):
  8 prompts of the builtin addition task (`fastprerl.data.addition_problems`, completion format), the same
  prompts in the same order (TRL's dataset is the fastprerl prompt stream's order, with shuffling off);
  G = 4 samples per prompt with Hugging Face `generate` (temperature 1.0, top_p 1.0, top_k off), exactly
  `max_new_tokens` = 12 new tokens unless EOS (no other stop rule in either); the same reward (first
  number of the completion == the gold sum); GRPO advantages (r - mean_g) / std_g; a token-mean loss over
  all completion tokens of the 32 samples; one full fine-tuning AdamW step (lr 1e-5, weight decay 0.01,
  betas 0.9/0.999, eps 1e-8, grad clip 1.0, constant LR); no KL term, no reference model; fp32, SDPA
  attention, no gradient checkpointing, no vLLM.

Timers:
  step s (primary)  wall time between the ends of consecutive optimizer steps, i.e. everything a trainer
                    does per step (prompt fetch, generation, reward, loss, backward, optimizer, its own
                    per-step logging); the first `warmup_steps` steps are excluded, median of the rest
  own timer         fastprerl: `perf/step_s` of metrics.jsonl (rollout .. optimizer step);
                    TRL: on_step_begin .. on_step_end (generation .. optimizer step)
  rollout / train   fastprerl: `perf/rollout_s` and `perf/reward_s + perf/train_s`;
                    TRL: `_generate_and_score_completions` (generation, reward, advantages) and the rest
Memory: resident set size of the worker process. baseline = RSS after the trainer (model, tokenizer,
optimizer object, data) was built, after gc + malloc_trim; then VmHWM is reset (/proc/self/clear_refs)
and read at the end of the last step (before any final save): peak MB = that VmHWM, peak extra MB =
peak - baseline (it includes the gradients and AdamW's states, created at the first step in both).
"""
from __future__ import annotations

import json
import os
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
MARK = "@@E2E_RESULT@@ "

# The settings both trainers run with. `steps` = warmup_steps + timed steps.
SETTINGS: dict[str, Any] = {
    "model": "builtin:smollm2-135m",
    "data_digits": 2,
    "data_size": 10000,
    "prompts_per_step": 8,
    "samples_per_prompt": 4,
    "max_new_tokens": 12,
    "temperature": 1.0,
    "top_p": 1.0,
    "top_k": 0,
    "lr": 1e-5,
    "weight_decay": 0.01,
    "grad_clip": 1.0,
    "kl_coef": 0.0,
    "dtype": "float32",
    "attn_implementation": "sdpa",
    "seed": 0,
    "steps": 7,
    "warmup_steps": 2,
}
# --quick: a random-init tiny Llama with the SmolLM2 tokenizer, 3 steps (checks that both trainers run)
QUICK_SETTINGS = {**SETTINGS, "model": "builtin:tiny-llama", "steps": 3, "warmup_steps": 1}


# ----------------------------------------------------------------------------------------------
# the reward, written once and used by both trainers
# ----------------------------------------------------------------------------------------------
_NUMBER = re.compile(r"-?\d+")


def first_number_correct(completion: str, answer: str) -> float:
    """1.0 when the first integer in the completion equals the gold answer, else 0.0."""
    m = _NUMBER.search(completion)
    if m is None:
        return 0.0
    try:
        return 1.0 if int(m.group(0)) == int(str(answer).strip()) else 0.0
    except ValueError:
        return 0.0


def fastprerl_reward(responses, samples) -> list[float]:
    """fastprerl `reward.fn = "e2e_common:fastprerl_reward"`: (responses, samples) -> floats."""
    return [first_number_correct(r, s["answer"]) for r, s in zip(responses, samples)]


def trl_reward(completions, answer, **kwargs) -> list[float]:
    """TRL reward function: the dataset's `answer` column arrives as a keyword argument."""
    return [first_number_correct(c, a) for c, a in zip(completions, answer)]


# ----------------------------------------------------------------------------------------------
# measurement helpers (process-local)
# ----------------------------------------------------------------------------------------------
if str(BENCH_DIR) not in sys.path:
    sys.path.insert(0, str(BENCH_DIR))
from bench_memory import RssMeter  # noqa: E402  (the one RSS meter of bench/, shared with the harness)


def _import_harness():
    import harness
    return harness


def step_stats(ends: list[float], warmup: int) -> dict[str, Any]:
    """Median wall time between the ends of consecutive steps, the first `warmup` steps excluded."""
    gaps = [ends[i] - ends[i - 1] for i in range(max(1, warmup), len(ends))]
    return {"step_s_all": [round(g, 4) for g in gaps],
            "median_step_s": statistics.median(gaps) if gaps else None}


def _median_after(values: list[float], warmup: int) -> float | None:
    v = values[warmup:]
    return statistics.median(v) if v else None


def _cpu_seconds() -> float:
    t = os.times()
    return t.user + t.system


# ----------------------------------------------------------------------------------------------
# fastprerl worker
# ----------------------------------------------------------------------------------------------
def fastprerl_overrides(s: dict[str, Any], output_dir: str) -> list[str]:
    steps = int(s["steps"])
    return [
        f"run.output_dir={json.dumps(output_dir)}",
        f"run.seed={int(s['seed'])}",
        'run.device="cpu"',
        f'model.path={json.dumps(s["model"])}',
        f'model.dtype={json.dumps(s["dtype"])}',
        f'model.attn_implementation={json.dumps(s["attn_implementation"])}',
        "model.gradient_checkpointing=false",
        'data.source="builtin:addition"',
        f"data.digits={int(s['data_digits'])}",
        f"data.size={int(s['data_size'])}",
        'data.format="completion"',
        f"rollout.prompts_per_step={int(s['prompts_per_step'])}",
        f"rollout.samples_per_prompt={int(s['samples_per_prompt'])}",
        f"rollout.max_new_tokens={int(s['max_new_tokens'])}",
        f"rollout.temperature={float(s['temperature'])}",
        f"rollout.top_p={float(s['top_p'])}",
        "rollout.stop_at_newline=false",
        'rollout.backend="hf"',
        'reward.fn="e2e_common:fastprerl_reward"',
        f"algo.kl_coef={float(s['kl_coef'])}",
        'algo.adv_norm="std"',
        'algo.old_logp="detached"',
        f"optim.lr={float(s['lr'])}",
        f"optim.weight_decay={float(s['weight_decay'])}",
        f"optim.grad_clip={float(s['grad_clip'])}",
        f'schedule.phases=[{{name="grpo", steps={steps}, objectives=[{{name="grpo", weight=1.0}}]}}]',
        "logging.progress=false",
        "logging.console=false",
        "logging.samples_every=0",
        "logging.view_gap=false",
        "logging.tensorboard=false",
        "logging.wandb=false",
    ]


def run_fastprerl(s: dict[str, Any]) -> dict[str, Any]:
    import torch

    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    from fastprerl.config import load_config
    from fastprerl.trainer import Trainer

    out: dict[str, Any] = {"trainer": "fastprerl"}
    with tempfile.TemporaryDirectory(prefix="e2e_fastprerl_") as tmp:
        cfg = load_config(REPO / "configs" / "dsrl.toml", fastprerl_overrides(s, str(Path(tmp) / "run")))
        t0 = time.perf_counter()
        trainer = Trainer(cfg)
        out["build_s"] = round(time.perf_counter() - t0, 2)
        meter = RssMeter()
        steps = int(s["steps"])
        ends: list[float] = []
        orig = trainer.train_step

        def timed_step(phase):
            row = orig(phase)
            ends.append(time.perf_counter())
            if len(ends) == steps:
                meter.read_peak()
            return row

        trainer.train_step = timed_step  # instance attribute: times the loop's own calls
        cpu0, t_train0 = _cpu_seconds(), time.perf_counter()
        status = trainer.train()
        wall = time.perf_counter() - t_train0
        out["cpu_util"] = round((_cpu_seconds() - cpu0) / max(wall, 1e-9), 2)
        if status != "complete" or len(ends) != steps:
            raise RuntimeError(f"fastprerl run ended {status!r} after {len(ends)} of {steps} steps")
        rows = [json.loads(line) for line in (Path(tmp) / "run" / "metrics.jsonl").read_text().splitlines()
                if line.strip()]
        rows = [r for r in rows if "perf/step_s" in r]
        w = int(s["warmup_steps"])
        out.update(step_stats(ends, w))
        out["own_step_s"] = _median_after([r["perf/step_s"] for r in rows], w)
        out["rollout_s"] = _median_after([r["perf/rollout_s"] for r in rows], w)
        out["train_s"] = _median_after([r["perf/reward_s"] + r["perf/train_s"] for r in rows], w)
        out["response_len_mean"] = statistics.mean(r["rollout/response_len_mean"] for r in rows)
        out["reward_mean"] = statistics.mean(r["reward/mean"] for r in rows)
        out["own_step_s_all"] = [round(r["perf/step_s"], 4) for r in rows]
        out["rollout_s_all"] = [round(r["perf/rollout_s"], 4) for r in rows]
        out["packed_tokens"] = [r.get("train/packed_tokens") for r in rows]
        out.update(meter.summary())
        out["threads"] = torch.get_num_threads()
    return out


# ----------------------------------------------------------------------------------------------
# TRL worker
# ----------------------------------------------------------------------------------------------
TRL_FIXED = {
    # one optimizer step = one generation batch = 8 prompts x 4 = 32 completions:
    # generation_batch_size = per_device_train_batch_size * processes * steps_per_generation = 32 * 1 * 1
    "per_device_train_batch_size": 32,
    "gradient_accumulation_steps": 1,
    "steps_per_generation": 1,
    "num_iterations": 1,            # no reuse of a generation batch: on-policy, old log-probs = detached
    "beta": 0.0,                    # no KL, no reference model
    "loss_type": "dapo",            # token-mean over every completion token of the generation batch
    "scale_rewards": "group",       # (r - mean_g) / std_g
    "epsilon": 0.2,
    "mask_truncated_completions": False,
    "use_vllm": False,
    "use_transformers_continuous_batching": False,
    "gradient_checkpointing": False,
    "bf16": False,
    "fp16": False,
    "use_cpu": True,
    "optim": "adamw_torch",
    "lr_scheduler_type": "constant",
    "warmup_steps": 0,
    "adam_beta1": 0.9,
    "adam_beta2": 0.999,
    "adam_epsilon": 1e-8,
    "shuffle_dataset": False,       # the dataset is already in the fastprerl prompt stream's order
    "logging_steps": 1,
    "report_to": "none",
    "save_strategy": "no",
    "disable_tqdm": True,
    "log_completions": False,
    "dataloader_num_workers": 0,
    "remove_unused_columns": False,
}


def trl_config_kwargs(s: dict[str, Any], output_dir: str) -> dict[str, Any]:
    kw = dict(TRL_FIXED)
    kw["per_device_train_batch_size"] = int(s["prompts_per_step"]) * int(s["samples_per_prompt"])
    kw.update(output_dir=output_dir, num_generations=int(s["samples_per_prompt"]),
              max_completion_length=int(s["max_new_tokens"]), temperature=float(s["temperature"]),
              top_p=float(s["top_p"]), top_k=int(s["top_k"]), learning_rate=float(s["lr"]),
              weight_decay=float(s["weight_decay"]), max_grad_norm=float(s["grad_clip"]),
              max_steps=int(s["steps"]), seed=int(s["seed"]))
    return kw


def _model_folder(spec: str, tmp: Path, seed: int) -> str:
    """A folder TRL can load with from_pretrained holding the same weights fastprerl trains."""
    from fastprerl import models

    if spec == "builtin:smollm2-135m":
        return str(models._smollm2_cached())
    if spec in ("builtin:tiny-llama", "builtin:tiny-qwen2"):
        folder = tmp / "model"
        model = models.load_model(spec, seed=seed)
        model.config.use_cache = True
        model.save_pretrained(folder)
        models.load_tokenizer(spec).save_pretrained(folder)
        del model
        return str(folder)
    return spec


def ordered_prompts(s: dict[str, Any], n: int) -> list[dict[str, str]]:
    """The first n problems of the fastprerl prompt stream (same problems, same order as fastprerl)."""
    from fastprerl.data import PromptStream, addition_problems

    problems = addition_problems(int(s["data_size"]), int(s["data_digits"]), int(s["seed"]))
    return PromptStream(problems, int(s["seed"]), True).next_batch(n)


def run_trl(s: dict[str, Any]) -> dict[str, Any]:
    import torch
    import transformers
    import trl
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback

    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    from trl import GRPOConfig, GRPOTrainer

    out: dict[str, Any] = {"trainer": "trl", "trl_version": trl.__version__}
    steps, w = int(s["steps"]), int(s["warmup_steps"])
    torch.manual_seed(int(s["seed"]))
    with tempfile.TemporaryDirectory(prefix="e2e_trl_") as tmp:
        t0 = time.perf_counter()
        folder = _model_folder(s["model"], Path(tmp), int(s["seed"]))
        tok = AutoTokenizer.from_pretrained(folder)
        if tok.pad_token_id is None:
            tok.pad_token = tok.eos_token
        tok.padding_side = "left"
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=getattr(torch, s["dtype"]),
                                                     attn_implementation=s["attn_implementation"])
        probs = ordered_prompts(s, steps * int(s["prompts_per_step"]))
        ds = Dataset.from_list([{"prompt": p["prompt"], "answer": p["answer"]} for p in probs])
        kw = trl_config_kwargs(s, str(Path(tmp) / "out"))
        out["trl_config"] = {k: v for k, v in kw.items() if k != "output_dir"}
        args = GRPOConfig(**kw)

        meter_box: dict[str, Any] = {}
        begins: list[float] = []
        ends: list[float] = []
        gen_s: list[float] = []

        class StepTimer(TrainerCallback):
            def on_step_begin(self, args, state, control, **kwargs):
                begins.append(time.perf_counter())

            def on_step_end(self, args, state, control, **kwargs):
                ends.append(time.perf_counter())
                if len(ends) == steps and "meter" in meter_box:
                    meter_box["meter"].read_peak()

        trainer = GRPOTrainer(model=model, reward_funcs=[trl_reward], args=args, train_dataset=ds,
                              processing_class=tok, callbacks=[StepTimer()])
        out["build_s"] = round(time.perf_counter() - t0, 2)
        out["generation_config"] = {k: v for k, v in trainer.generation_kwargs.items()
                                    if isinstance(v, (int, float, str, bool, list, type(None)))}
        out["gen_batch"] = {"generation_batch_size": args.generation_batch_size,
                            "steps_per_generation": args.steps_per_generation,
                            "gradient_accumulation_steps": args.gradient_accumulation_steps}
        orig_gen = trainer._generate_and_score_completions
        lens: list[float] = []

        def timed_gen(inputs):
            tg = time.perf_counter()
            res = orig_gen(inputs)
            gen_s.append(time.perf_counter() - tg)
            lens.append(float(res["completion_mask"].sum(1).float().mean()))
            return res

        trainer._generate_and_score_completions = timed_gen
        meter = RssMeter()
        meter_box["meter"] = meter
        cpu0, t_train0 = _cpu_seconds(), time.perf_counter()
        trainer.train()
        wall = time.perf_counter() - t_train0
        out["cpu_util"] = round((_cpu_seconds() - cpu0) / max(wall, 1e-9), 2)
        if len(ends) != steps:
            raise RuntimeError(f"TRL ran {len(ends)} of {steps} steps")
        own = [e - b for b, e in zip(begins, ends)]
        out.update(step_stats(ends, w))
        out["own_step_s"] = _median_after(own, w)
        out["rollout_s"] = _median_after(gen_s, w)
        out["train_s"] = _median_after([o - g for o, g in zip(own, gen_s)], w)
        out["own_step_s_all"] = [round(x, 4) for x in own]
        out["rollout_s_all"] = [round(x, 4) for x in gen_s]
        out["response_len_mean"] = statistics.mean(lens) if lens else None
        hist = [h for h in trainer.state.log_history if "reward" in h]
        out["reward_mean"] = statistics.mean(h["reward"] for h in hist) if hist else None
        out.update(meter.summary())
        out["threads"] = torch.get_num_threads()
        out["transformers_version"] = transformers.__version__
    return out


# ----------------------------------------------------------------------------------------------
# parent side: run one worker process
# ----------------------------------------------------------------------------------------------
def _proc_stat() -> dict[str, int] | None:
    try:
        f = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
        v = [int(x) for x in f] + [0] * 8
        user, nice, system, idle, iowait, irq, softirq, steal = v[:8]
        return {"busy": user + nice + system + irq + softirq, "idle": idle + iowait, "steal": steal}
    except (OSError, ValueError, IndexError):
        return None


def run_worker(which: str, settings: dict[str, Any], timeout_s: float = 1800.0) -> dict[str, Any]:
    """Run one trainer in a fresh process; returns its result dict plus how busy the machine was."""
    import resource
    import subprocess

    h = _import_harness()
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), str(BENCH_DIR)] +
                                        ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", which, json.dumps(settings)]
    tick = os.sysconf("SC_CLK_TCK")
    st0, ru0, l0, t0 = _proc_stat(), resource.getrusage(resource.RUSAGE_CHILDREN), h.load1(), time.monotonic()
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, env=env, cwd=str(REPO))
    except subprocess.TimeoutExpired:
        return {"trainer": which, "status": "error", "reason": f"timed out after {timeout_s:.0f} s"}
    wall = time.monotonic() - t0
    st1, ru1 = _proc_stat(), resource.getrusage(resource.RUSAGE_CHILDREN)
    res = None
    for line in r.stdout.splitlines():
        if line.startswith(MARK):
            res = json.loads(line[len(MARK):])
    if res is None:
        tail = (r.stderr or r.stdout).strip().splitlines()[-12:]
        return {"trainer": which, "status": "error",
                "reason": " | ".join(tail)[-1500:] or f"worker exited with code {r.returncode}"}
    res["process_wall_s"] = round(wall, 1)
    res["load1_before"], res["load1_after"] = l0, h.load1()
    child_cpu = (ru1.ru_utime - ru0.ru_utime) + (ru1.ru_stime - ru0.ru_stime)
    if st0 and st1:
        cores = os.cpu_count() or 1
        busy = (st1["busy"] - st0["busy"]) / tick
        res["other_cpu_frac"] = round(max(0.0, busy - child_cpu) / (wall * cores), 3)
        res["steal_frac"] = round((st1["steal"] - st0["steal"]) / tick / (wall * cores), 3)
    res["process_cpu_s"] = round(child_cpu, 1)
    return res


def main(argv: list[str]) -> int:
    if len(argv) == 3 and argv[0] == "--worker":
        which, settings = argv[1], json.loads(argv[2])
        import logging
        logging.basicConfig(level=logging.WARNING)
        try:
            res = {"fastprerl": run_fastprerl, "trl": run_trl}[which](settings)
            res["status"] = "ok"
        except Exception as e:  # noqa: BLE001
            import traceback
            traceback.print_exc()
            res = {"trainer": which, "status": "error", "reason": f"{type(e).__name__}: {e}"[:1500]}
        sys.stdout.flush()
        print(MARK + json.dumps(res, default=str), flush=True)
        return 0
    print(__doc__)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
