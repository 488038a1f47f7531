"""DSRL steps of a ~1.5B model on one GPU capped at 24 GB: peak memory and step time per phase.

    PYTHONPATH=. python bench/gpu_memory_24gb.py [--out DIR] [--cap-gb 24]      (GPU machine, ~3 min on an H100)
    PYTHONPATH=. python bench/gpu_memory_24gb.py --device cpu --tiny --out DIR  (smoke run: the script works)

What runs: fastprerl's Trainer (its real train_step: rollout, reward, pack, fused loss, optimizer step) with
the settings of configs/dsrl_1gpu_24gb.toml, on a model of Qwen2.5-1.5B-Instruct's shape (config written
below; random bf16 weights, nothing downloaded) with a character-level tokenizer built here, except:
  - rollout.backend = "hf" (so that the script needs no vLLM), so the rollout peak is HF generate's;
  - data = builtin:addition in completion format and a stand-in reward (parity of the response's characters):
    a random model solves nothing, and the loss needs mixed groups; responses run to max_new_tokens (no EOS);
  - fewer prompts per step and shorter responses (flags below) to stay within ~5 minutes.
Variants: "offload" (the config: AdamW state on the CPU) and "resident" (optim.offload_optimizer_state =
false). Phases: --nsr-steps NSR-PreRL steps, then --grpo-steps GRPO steps, per variant.

Cap: torch.cuda.set_per_process_memory_fraction(cap / total) makes any allocation beyond --cap-gb raise an
out-of-memory error, as on a 24 GB card (the CUDA context, ~0.5 GB, is outside torch's count); an OOM is
recorded as the variant's result, and the planned configuration does not fit. On CPU (the smoke run) the cap
applies to the process's peak resident set size.
Exit status: 0 only if every variant ran every phase within the cap; 1 if a variant ran out of memory (or, on
CPU, peaked above the cap), raised (e.g. the trainer's non-finite loss check on a wrong kernel result), or
finished a phase with no step; 2 without a CUDA device (and not --device cpu). Per step: peak torch.cuda.max_memory_allocated during the rollout and
during the rest of the step (reward, packed forward/backward, optimizer step), peak reserved, and the
Trainer's own step / rollout / train times. Needs torch, transformers (and triton for logprob_impl
"triton") and this checkout on PYTHONPATH; installs nothing, no network.
Outputs: printed, and gpu_memory_24gb.jsonl (appended) + gpu_memory_24gb.md under --out (default
else bench/results/; the CPU smoke run writes gpu_memory_24gb_cpu_tiny.*).
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
CONFIG = REPO / "configs" / "dsrl_1gpu_24gb.toml"
GB = 1024 ** 3

# Qwen2.5-1.5B-Instruct's config.json (the fields that set the shape)
QWEN25_15B = dict(vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                  num_attention_heads=12, num_key_value_heads=2, max_position_embeddings=32768,
                  rms_norm_eps=1e-6, tie_word_embeddings=True, hidden_act="silu", attention_dropout=0.0)
TINY = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
            num_key_value_heads=1, max_position_embeddings=2048, rms_norm_eps=1e-6, tie_word_embeddings=True,
            hidden_act="silu", attention_dropout=0.0)
SPECIALS = ["<pad>", "<s>", "</s>"]   # ids 0, 1, 2


def parity_reward(responses, samples):
    """Stand-in reward (not a verifier): parity of the sum of the response's character codes."""
    return [float(sum(map(ord, r)) % 2) for r in responses]


def char_tokenizer(vocab_size: int):
    """One token per character (printable ASCII and newline), fillers <xN> up to the model's vocabulary."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(SPECIALS + [chr(c) for c in range(32, 127)] + ["\n"])}
    for i in range(len(vocab), vocab_size):
        vocab[f"<x{i}>"] = i
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<pad>"))
    tk.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tk.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                   unk_token="<pad>")


def build_model_dir(shape: dict, device: str, path: Path, seed: int = 0):
    """Random-init model of `shape` in bf16 (fp32 on CPU) + the character tokenizer, saved to `path`."""
    import torch
    from transformers import AutoModelForCausalLM, Qwen2Config

    conf = Qwen2Config(**shape, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    conf.rope_theta = 1_000_000.0
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(conf, dtype=dtype)
    model.save_pretrained(path)
    char_tokenizer(shape["vocab_size"]).save_pretrained(path)
    n = sum(p.numel() for p in model.parameters())
    del model
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
    return n, str(dtype).replace("torch.", "")


def machine_meta(device: str, cap_gb: float) -> dict:
    import torch
    import transformers

    meta = {"torch": torch.__version__, "transformers": transformers.__version__, "python": platform.python_version(),
            "host": platform.node(), "device": device, "cap_gb": cap_gb}
    try:
        import triton
        meta["triton"] = triton.__version__
    except ImportError:
        meta["triton"] = None
    if device == "cuda":
        p = torch.cuda.get_device_properties(0)
        meta.update(gpu=p.name, gpu_total_gb=round(p.total_memory / GB, 2))
    try:
        meta["git_sha"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                                         text=True, timeout=10).stdout.strip()
    except Exception:  # noqa: BLE001
        meta["git_sha"] = None
    return meta


def run_variant(name: str, model_dir: Path, args, out_root: Path, deadline: float) -> list:
    """NSR-PreRL then GRPO steps through the Trainer; one record per step (or one OOM / error record)."""
    import torch

    from fastprerl.config import load_config
    from fastprerl.trainer import Trainer

    cuda = args.device == "cuda"
    ov = [f"model.path={model_dir}", "model.empty_token=auto", "rollout.backend=hf", "data.source=builtin:addition",
          "data.format=completion", "data.size=512", f"reward.fn={Path(__file__).stem}:parity_reward",
          f"run.output_dir={out_root / name}", f"run.device={args.device}", "logging.tensorboard=false",
          "logging.progress=false", "logging.console=false", "logging.samples_every=0",
          f"rollout.prompts_per_step={args.prompts}", f"rollout.samples_per_prompt={args.samples}",
          f"rollout.max_new_tokens={args.max_new_tokens}",
          f"optim.offload_optimizer_state={'true' if name == 'offload' else 'false'}",
          f"optim.max_tokens_per_microbatch={args.microbatch_tokens}"]
    if not cuda:
        ov += ["model.dtype=float32", "model.logprob_impl=torch", "rollout.generation_batch_size=64"]
    elif args.logprob_impl:
        ov.append(f"model.logprob_impl={args.logprob_impl}")
    cfg = load_config(CONFIG, ov)
    phases = [("nsr_prerl", args.nsr_steps), ("grpo", args.grpo_steps)]
    records = []
    t = None
    try:
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        t = Trainer(cfg)
        by_name = {p.name: p for p in cfg.schedule.phases}
        peaks = {}
        real_generate = t.rollout.generate

        def generate(prompts, n):   # the rollout's own peak, then a fresh peak for the rest of the step
            if cuda:
                torch.cuda.reset_peak_memory_stats()
            out = real_generate(prompts, n)
            if cuda:
                torch.cuda.synchronize()
                peaks["rollout"] = torch.cuda.max_memory_allocated() / GB
                peaks["rollout_reserved"] = torch.cuda.max_memory_reserved() / GB
                torch.cuda.reset_peak_memory_stats()
            return out

        t.rollout.generate = generate
        after_init = torch.cuda.memory_allocated() / GB if cuda else None
        for phase_name, steps in phases:
            phase = by_name[phase_name]
            if phase_name == "grpo":
                t._switch_phase(phase)
            for _i in range(steps):
                if time.monotonic() > deadline:
                    records.append({"variant": name, "phase": phase_name, "step": t.step,
                                    "skipped": "time budget spent"})
                    break
                m = t.train_step(phase)
                t.step += 1
                rec = {"variant": name, "phase": phase_name, "step": t.step - 1,
                       "step_s": m["perf/step_s"], "rollout_s": m["perf/rollout_s"], "train_s": m["perf/train_s"],
                       "rows": m["train/rows"], "packed_tokens": m["train/packed_tokens"],
                       "microbatches": m["train/microbatches"], "response_len": m["rollout/response_len_mean"],
                       "allocated_after_init_gb": after_init}
                if cuda:
                    torch.cuda.synchronize()
                    rec.update(peak_rollout_gb=peaks.get("rollout"), peak_train_gb=torch.cuda.max_memory_allocated() / GB,
                               peak_reserved_gb=max(peaks.get("rollout_reserved", 0.0),
                                                    torch.cuda.max_memory_reserved() / GB))
                else:
                    rec["process_max_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 ** 2
                records.append(rec)
                print(json.dumps(rec), flush=True)
    except Exception as e:  # noqa: BLE001  an OOM under the cap is a result, not a crash of the script
        oom = type(e).__name__ == "OutOfMemoryError" or "out of memory" in str(e).lower()
        records.append({"variant": name, "error": f"{type(e).__name__}: {str(e)[:500]}", "oom": oom})
        print(f"{name}: {type(e).__name__}: {str(e)[:500]}", flush=True)
    finally:
        if t is not None:
            t.reward_fn = None
        del t
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()
    return records


def summarise(records: list, meta: dict, args) -> str:
    lines = [f"# DSRL steps under a {meta['cap_gb']} GB cap ({meta.get('gpu', meta['device'])})", "",
             f"Model: Qwen2.5-1.5B-Instruct's shape, random weights ({meta['params'] / 1e9:.3f}B parameters, "
             f"{meta['dtype']}); settings of configs/dsrl_1gpu_24gb.toml with the HF rollout backend, "
             f"{args.prompts} prompts x {args.samples} samples x {args.max_new_tokens} new tokens, micro-batches "
             f"of {args.microbatch_tokens} tokens." if not args.tiny else
             "CPU smoke run of the script (tiny Qwen2 shape): the numbers say nothing about a GPU.", "",
             f"torch {meta['torch']}, transformers {meta['transformers']}, triton {meta['triton']}, "
             f"git {meta['git_sha']}, {meta['date']}", ""]
    cuda = meta["device"] == "cuda"
    head = ("| variant | phase | steps | step s | rollout s | train s | packed tokens | peak alloc rollout GB "
            "| peak alloc train GB | peak reserved GB |") if cuda else \
        "| variant | phase | steps | step s | rollout s | train s | packed tokens | process max RSS GB |"
    lines += [head, "|" + "---|" * (head.count("|") - 1)]
    for variant in dict.fromkeys(r["variant"] for r in records):
        rs = [r for r in records if r["variant"] == variant]
        err = [r for r in rs if "error" in r]
        if err:
            lines.append(f"| {variant} | - | - | {'OOM' if err[0]['oom'] else 'error'}: {err[0]['error'][:160]} |")
        for phase in dict.fromkeys(r["phase"] for r in rs if "step_s" in r):
            ps = [r for r in rs if r.get("phase") == phase and "step_s" in r]
            mean = lambda k: sum(r[k] for r in ps) / len(ps)  # noqa: E731
            row = (f"| {variant} | {phase} | {len(ps)} | {mean('step_s'):.2f} | {mean('rollout_s'):.2f} | "
                   f"{mean('train_s'):.2f} | {max(r['packed_tokens'] for r in ps)} |")
            if cuda:
                row += (f" {max(r['peak_rollout_gb'] for r in ps):.2f} | {max(r['peak_train_gb'] for r in ps):.2f} | "
                        f"{max(r['peak_reserved_gb'] for r in ps):.2f} |")
            else:
                row += f" {max(r['process_max_rss_gb'] for r in ps):.2f} |"
            lines.append(row)
    lines += ["", "Peaks are torch.cuda.max_memory_allocated / max_memory_reserved (CUDA context not included); "
              "'rollout' is HF generate's, 'train' covers reward, packing, forward/backward and the optimizer step."
              if cuda else "Process max RSS is the whole process's high-water mark so far (not per phase)."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    ap.add_argument("--tiny", action="store_true", help="tiny model shape (smoke run of the script)")
    ap.add_argument("--out", default=None, help="output folder (default bench/results)")
    ap.add_argument("--cap-gb", type=float, default=24.0)
    ap.add_argument("--variants", default="offload,resident")
    ap.add_argument("--nsr-steps", type=int, default=2)
    ap.add_argument("--grpo-steps", type=int, default=2)
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=512)
    ap.add_argument("--microbatch-tokens", type=int, default=8192)
    ap.add_argument("--logprob-impl", default=None, help="override model.logprob_impl (config: triton)")
    ap.add_argument("--budget-s", type=float, default=270.0, help="no new step is started after this")
    args = ap.parse_args(argv)
    t0 = time.monotonic()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    if str(BENCH) not in sys.path:     # the stand-in reward is imported as <this module>:parity_reward
        sys.path.insert(0, str(BENCH))
    import torch

    if args.device == "cuda":
        if not torch.cuda.is_available():
            print("gpu_memory_24gb: no CUDA device (use --device cpu --tiny for the smoke run)", file=sys.stderr)
            return 2
        total = torch.cuda.get_device_properties(0).total_memory
        frac = min(1.0, args.cap_gb * GB / total)
        torch.cuda.set_per_process_memory_fraction(frac, 0)
        print(f"capped at {args.cap_gb} GB = {frac:.3f} of {total / GB:.1f} GB", flush=True)
    if args.tiny:
        args.prompts, args.samples = min(args.prompts, 2), min(args.samples, 4)
        args.max_new_tokens, args.microbatch_tokens = min(args.max_new_tokens, 8), min(args.microbatch_tokens, 64)
        args.nsr_steps, args.grpo_steps = min(args.nsr_steps, 1), min(args.grpo_steps, 1)
    out = Path(args.out or BENCH / "results")
    out.mkdir(parents=True, exist_ok=True)
    stem = "gpu_memory_24gb"
    if args.device != "cuda" or args.tiny:
        stem += f"_{args.device}" + ("_tiny" if args.tiny else "")
    meta = machine_meta(args.device, args.cap_gb)
    meta["date"] = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    work = Path(tempfile.mkdtemp(prefix="fastprerl-gpu-memory-"))
    records = []
    try:
        t_build = time.perf_counter()
        n_params, dtype = build_model_dir(TINY if args.tiny else QWEN25_15B, args.device, work / "model")
        meta.update(params=n_params, dtype=dtype, build_s=round(time.perf_counter() - t_build, 1))
        print(f"model: {n_params / 1e9:.3f}B parameters ({dtype}), written in {meta['build_s']} s", flush=True)
        deadline = t0 + args.budget_s
        for v in [v.strip() for v in args.variants.split(",") if v.strip()]:
            if v not in ("offload", "resident"):
                raise SystemExit(f"--variants: unknown variant {v!r}; choose offload,resident")
            records += run_variant(v, work / "model", args, work / "runs", deadline)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    meta["wall_s"] = round(time.monotonic() - t0, 1)
    with open(out / f"{stem}.jsonl", "a") as f:
        for r in records:
            f.write(json.dumps({**meta, **r}, default=str) + "\n")
    report = summarise(records, meta, args)
    (out / f"{stem}.md").write_text(report)
    print(report, flush=True)
    print(f"wrote {out / (stem + '.md')} and {out / (stem + '.jsonl')} ({meta['wall_s']} s)", flush=True)
    bad = plan_failures(records, args)
    for b in bad:
        print(f"gpu_memory_24gb: FAILED: {b}", file=sys.stderr, flush=True)
    return 1 if bad else 0


def plan_failures(records: list, args) -> list:
    """Why the planned configurations did not all run within the cap (empty when they did)."""
    out = []
    phases = [p for p, n in (("nsr_prerl", args.nsr_steps), ("grpo", args.grpo_steps)) if n > 0]
    for variant in [v.strip() for v in args.variants.split(",") if v.strip()]:
        rs = [r for r in records if r.get("variant") == variant]
        err = next((r for r in rs if "error" in r), None)
        if err is not None:
            what = "does not fit the cap (out of memory)" if err["oom"] else "raised"
            out.append(f"{variant}: {what}: {err['error'][:300]}")
            continue
        for phase in phases:
            if not any(r.get("phase") == phase and "step_s" in r for r in rs):
                out.append(f"{variant}: no {phase} step ran")
        peak = max((r.get("peak_reserved_gb") or r.get("process_max_rss_gb") or 0.0 for r in rs), default=0.0)
        if peak > args.cap_gb:
            out.append(f"{variant}: peak {peak:.2f} GB > cap {args.cap_gb} GB")
    return out


if __name__ == "__main__":
    sys.exit(main())
