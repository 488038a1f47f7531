"""Compile every Triton kernel of kernels/ for GPU targets without a GPU, and report its resources.

For each target (sm_90 = H100/H200, sm_80 = A100), dtype, model head (H, V) of bench/shapes.py and row count,
the real launchers (kernels/triton_forward.py, kernels/triton_backward.py) build their `Launch` on meta
tensors with the configuration `default_config` picks for that target; the arguments are specialised by
Triton's own `native_specialize_impl`, as a real launch specialises them (unit strides become the constant 1,
sizes and pointers divisible by 16 carry tt.divisibility; torch allocations are 256-byte aligned), and
`triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32))` builds the cubin with the ptxas that
the triton wheel carries. Launches that compile to the same key (kernel, signature, constants,
divisibility, warps, stages, target) are compiled once.

Per compiled kernel: registers and stack bytes (cuobjdump -res-usage), shared memory (the compiled
kernel's metadata, what a launch requests), local-memory spill instructions (STL / LDL in the SASS of
cuobjdump -sass), and which matrix and load instructions the SASS uses (HGMMA = wgmma, HMMA = mma.sync,
LDGSTS = cp.async, LDG.E.128 = 16-byte loads, UTMALDG = TMA).

    python tools/triton_compile_check.py [--arch 90,80] [--json out.json] [--jobs 2]
tests/integration/test_triton_compile.py runs it (with the system Triton, and in tools/triton36_env.sh with 3.6).
"""
from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# per-block shared memory a kernel may request (cudaFuncAttributeMaxDynamicSharedMemorySize): 227 KB on
# sm_90, 163 KB on sm_80 (CUDA C Programming Guide, "Compute capabilities", technical specifications)
SMEM_LIMIT = {90: 232448, 80: 166912}
# fp32 kernels (exact IEEE dot on FFMA) may spill a little; this ceiling keeps it small (the tile choices before
# per-architecture configs spilled up to ~3300 instructions in the 64-row d_W paths)
FP32_SPILL_LIMIT = 64
# LM heads (hidden, vocabulary) of the models the kernels serve; bench/shapes.py has the others' sources
HEADS = {"smollm2-135m": (576, 49152), "qwen2.5-1.5b": (1536, 151936), "qwen3-4b": (2560, 151936),
         "llama3-8b": (4096, 128256)}
# rows per launch: few (16-row tiles) and many (a packed micro-batch); default_config has no other row classes
ROWS = (13, 16384)
DTYPES = ("bfloat16", "float16", "float32")


def _launches(arch: int):
    """(kind, label, Launch) for every configuration the launchers choose at HEADS x ROWS x DTYPES on `arch`."""
    import torch

    from fastprerl.kernels.triton_backward import backward_dh_launch, backward_dw_launch, backward_launch
    from fastprerl.kernels.triton_config import default_config
    from fastprerl.kernels.triton_forward import forward_launch, forward_partials, forward_splits

    meta = torch.device("meta")
    sms = 132 if arch >= 90 else 108
    for dtype_name in DTYPES:
        dtype = getattr(torch, dtype_name)
        for model, (H, V) in HEADS.items():
            for M in ROWS:
                h = torch.empty((M, H), device=meta, dtype=dtype)
                w = torch.empty((V, H), device=meta, dtype=dtype)
                t = torch.empty((M,), device=meta, dtype=torch.int64)
                rows = tuple(torch.empty((M,), device=meta, dtype=torch.float32) for _ in range(5))
                dh = torch.empty((M, H), device=meta, dtype=torch.float32)
                dw = torch.empty((V, H), device=meta, dtype=torch.float32)
                cfg = lambda kind: default_config(kind, M, V, H, dtype, meta, arch=arch)  # noqa: E731
                tag = f"{model} M={M} {dtype_name}"
                for ent in (False, True):
                    c = cfg("fwd")
                    splits, cols = forward_splits(M, V, c, sms)
                    part = forward_partials(M, splits, meta)
                    yield "fwd", tag, forward_launch(h, w, t, part, cols, 1.0, ent, c)
                    c = cfg("fwd_expect")   # the frozen-head forward
                    splits, cols = forward_splits(M, V, c, sms)
                    part = forward_partials(M, splits, meta)
                    ew = torch.empty((splits, M, H), device=meta, dtype=torch.float32)
                    yield "fwd_expect", tag, forward_launch(h, w, t, part, cols, 1.0, ent, c, ew=ew)
                    for need in ((True, True), (True, False), (False, True)):
                        yield "bwd", tag, backward_launch(h, w, t, rows, dh, dw, *need, ent, 1.0, cfg("bwd"))
                    yield "bwd_dh", tag, backward_dh_launch(h, w, t, rows, dh, ent, 1.0, cfg("bwd_dh"))
                    yield "bwd_dw", tag, backward_dw_launch(h, w, t, rows, dw, ent, 1.0, cfg("bwd_dw"))


def _spec(launch, arch: int) -> dict:
    """The compile key of a launch: what Triton's launcher would hand to the compiler."""
    from triton._C.libtriton import native_specialize_impl
    from triton.backends.nvidia.compiler import CUDABackend

    fn = launch.kernel
    names = fn.arg_names
    sig, consts, div = {}, {}, []
    for name, arg in zip(names, launch.args):
        kind, attr = native_specialize_impl(CUDABackend, arg, False, True, True)[:2]
        if kind == "constexpr":
            sig[name], consts[name] = "constexpr", attr
        else:
            sig[name] = kind
            if attr == "D":
                div.append(names.index(name))
    for name, v in launch.constexprs.items():
        sig[name], consts[name] = "constexpr", v
    return {"module": fn.fn.__module__, "kernel": fn.fn.__name__, "signature": sig, "constexprs": consts,
            "divisible": div, "num_warps": launch.num_warps, "num_stages": launch.num_stages, "arch": arch}


def _key(spec: dict) -> str:
    return json.dumps(spec, sort_keys=True)


def _tool(name: str) -> str:
    import triton
    return str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name)


def _sass_counts(sass: str) -> dict[str, int]:
    ops = re.findall(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)", sass)
    count = lambda pred: sum(1 for o in ops if pred(o))  # noqa: E731
    return {"stl": count(lambda o: o.startswith("STL")), "ldl": count(lambda o: o.startswith("LDL")),
            "hgmma": count(lambda o: o.startswith("HGMMA")), "hmma": count(lambda o: o.startswith("HMMA")),
            "ffma": count(lambda o: o.startswith("FFMA")), "ldgsts": count(lambda o: o.startswith("LDGSTS")),
            "ldg128": count(lambda o: o.startswith("LDG") and ".128" in o),
            "ldg": count(lambda o: o.startswith("LDG") and not o.startswith("LDGSTS")),
            "tma": count(lambda o: o.startswith("UTMALDG")), "red": count(lambda o: o.startswith("RED"))}


def compile_one(spec: dict) -> dict:
    """Compile one key; returns its resources (or the compile error)."""
    import importlib

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = getattr(importlib.import_module(spec["module"]), spec["kernel"])
    attrs = {(i,): [["tt.divisibility", 16]] for i in spec["divisible"]}
    t0 = time.perf_counter()
    try:
        k = triton.compile(ASTSource(fn, spec["signature"], spec["constexprs"], attrs),
                           target=GPUTarget("cuda", spec["arch"], 32),
                           options={"num_warps": spec["num_warps"], "num_stages": spec["num_stages"]})
    except Exception as e:  # noqa: BLE001  reported, and the test fails on it
        return {"error": f"{type(e).__name__}: {str(e)[-800:]}"}
    with tempfile.TemporaryDirectory() as d:
        cubin = Path(d) / "k.cubin"
        cubin.write_bytes(k.asm["cubin"])
        res = subprocess.run([_tool("cuobjdump"), "-res-usage", str(cubin)], capture_output=True, text=True,
                             check=True).stdout
        sass = subprocess.run([_tool("cuobjdump"), "-sass", str(cubin)], capture_output=True, text=True,
                              check=True).stdout
    reg = re.search(r"REG:(\d+)", res)
    stack = re.search(r"STACK:(\d+)", res)
    return {"regs": int(reg.group(1)) if reg else None, "stack": int(stack.group(1)) if stack else None,
            "smem": int(k.metadata.shared), "compile_s": round(time.perf_counter() - t0, 2), **_sass_counts(sass)}


def check(archs=(90, 80), jobs: int = 2) -> list[dict]:
    """Every distinct compile key for `archs`, compiled on `jobs` processes; one row per key."""
    import triton

    keys: dict[str, dict] = {}
    for arch in archs:
        for kind, tag, launch in _launches(arch):
            spec = _spec(launch, arch)
            row = keys.setdefault(_key(spec), {"spec": spec, "kind": kind, "shapes": []})
            row["shapes"].append(tag)
    rows = list(keys.values())
    with cf.ProcessPoolExecutor(max_workers=jobs) as ex:
        for row, out in zip(rows, ex.map(compile_one, [r["spec"] for r in rows])):
            row.update(out)
    for row in rows:
        s = row["spec"]
        c = s["constexprs"]
        dtype = s["signature"]["h_ptr"].lstrip("*")
        row.update(triton=triton.__version__, arch=s["arch"], dtype=dtype, sixteen_bit=dtype in ("bf16", "fp16"),
                   config=f"{c['BLOCK_M']}x{c['BLOCK_N']}x{c['BLOCK_K']} w{s['num_warps']} s{s['num_stages']}",
                   flags=",".join(f"{k[4:].lower()}" for k in ("HAS_ENTROPY", "HAS_DH", "HAS_DW", "HAS_EXPECT")
                                   if c.get(k)),
                   smem_limit=SMEM_LIMIT[s["arch"]])
    return rows


def problems(rows: list[dict]) -> list[str]:
    """What the CI check fails on: compile errors, shared memory over the limit, spills in 16-bit kernels,
    more than FP32_SPILL_LIMIT spill instructions in an fp32 kernel."""
    out = []
    for r in rows:
        name = f"{r['spec']['kernel']} sm_{r['arch']} {r['dtype']} {r['config']} [{r['flags']}]"
        if "error" in r:
            out.append(f"{name}: compile error {r['error']}")
            continue
        if r["smem"] > r["smem_limit"]:
            out.append(f"{name}: shared memory {r['smem']} B > {r['smem_limit']} B")
        if r["sixteen_bit"] and (r["stl"] or r["ldl"]):
            out.append(f"{name}: {r['stl']} STL + {r['ldl']} LDL spill instructions in a 16-bit kernel")
        elif r["stl"] + r["ldl"] > FP32_SPILL_LIMIT:
            out.append(f"{name}: {r['stl']} STL + {r['ldl']} LDL spill instructions > {FP32_SPILL_LIMIT} (fp32)")
    return out


def table(rows: list[dict]) -> str:
    head = ["triton", "arch", "kernel", "dtype", "flags", "config", "regs", "stack", "smem KB", "STL", "LDL",
            "HGMMA", "HMMA", "LDGSTS", "LDG.128", "s"]
    lines = []
    for r in sorted(rows, key=lambda r: (-r["arch"], r["spec"]["kernel"], r["dtype"], r["config"], r["flags"])):
        if "error" in r:
            lines.append([r["triton"], f"sm_{r['arch']}", r["spec"]["kernel"], r["dtype"], r["flags"], r["config"],
                          "ERROR"] + [""] * 9)
            continue
        lines.append([r["triton"], f"sm_{r['arch']}", r["spec"]["kernel"].replace("_logprob_", ""), r["dtype"],
                      r["flags"], r["config"], r["regs"], r["stack"], f"{r['smem'] / 1024:.0f}", r["stl"], r["ldl"],
                      r["hgmma"], r["hmma"], r["ldgsts"], r["ldg128"], r["compile_s"]])
    widths = [max(len(str(x)) for x in col) for col in zip(head, *lines)]
    fmt = lambda row: "  ".join(str(c).ljust(w) for c, w in zip(row, widths))  # noqa: E731
    return "\n".join([fmt(head)] + [fmt(x) for x in lines])


def summary(rows: list[dict]) -> str:
    """One line per (target, kernel, dtype, configuration): the worst of its variants and shapes."""
    groups: dict[tuple, list] = {}
    for r in rows:
        groups.setdefault((r["triton"], r["arch"], r["spec"]["kernel"], r["dtype"], r["config"]), []).append(r)
    head = ["triton", "arch", "kernel", "dtype", "config", "variants", "regs", "smem KB", "spills", "HGMMA", "HMMA",
            "LDGSTS", "LDG.128"]
    lines = []
    for (tv, arch, kern, dtype, cfg), rs in sorted(groups.items(), key=lambda kv: (-kv[0][1], kv[0][2:])):
        ok = [r for r in rs if "error" not in r]
        worst = lambda k: max((r[k] for r in ok), default="-")  # noqa: E731
        lines.append([tv, f"sm_{arch}", kern.replace("_logprob_", "").replace("_kernel", ""), dtype, cfg,
                      f"{len(rs)}" + (f" ({len(rs) - len(ok)} failed)" if len(ok) < len(rs) else ""),
                      worst("regs"), f"{worst('smem') / 1024:.0f}" if ok else "-",
                      max((r["stl"] + r["ldl"] for r in ok), default="-"), worst("hgmma"), worst("hmma"),
                      worst("ldgsts"), worst("ldg128")])
    widths = [max(len(str(x)) for x in col) for col in zip(head, *lines)]
    fmt = lambda row: "  ".join(str(c).ljust(w) for c, w in zip(row, widths))  # noqa: E731
    return "\n".join([fmt(head)] + [fmt(x) for x in lines])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", default="90,80")
    ap.add_argument("--json", default=None, help="write the rows here")
    ap.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1))
    args = ap.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("triton_compile_check: unset TRITON_INTERPRET (the interpreter does not compile)", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    rows = check(tuple(int(a) for a in args.arch.split(",")), args.jobs)
    print(table(rows))
    bad = problems(rows)
    print(f"\n{len(rows)} distinct compiles in {time.perf_counter() - t0:.0f} s; {len(bad)} problems")
    for b in bad:
        print("  " + b)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1, default=str))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
