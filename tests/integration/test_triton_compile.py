"""Every Triton kernel of kernels/ compiles for sm_90 (H100/H200) and sm_80 (A100) in every configuration the
launchers choose at real model shapes, within the target's shared memory, and without register spills in the
16-bit kernels (and few in the fp32 ones) (tools/triton_compile_check.py does the work; no GPU is needed: Triton's ptxas builds the
cubin). CI runs this file with the system Triton and, through tools/triton36_env.sh, with Triton 3.6 (what
the GPU machines have)."""
import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
TOOLS = ROOT / "tools"
sys.path.insert(0, str(TOOLS))
import triton_compile_check as C  # noqa: E402

# The compiles run in fresh processes: this one has imported triton under the interpreter (tests/conftest.py).
if importlib.util.find_spec("triton") is None:
    pytest.skip("triton is not installed", allow_module_level=True)

# ~2 minutes on a quiet 2-core machine (168 compiles on 2 processes), ~7 under a load average of 7
pytestmark = pytest.mark.timeout(1200)

KERNELS = {"_logprob_fwd_kernel", "_logprob_bwd_kernel", "_logprob_bwd_dh_kernel", "_logprob_bwd_dw_kernel"}


def _run(cmd, timeout):
    """subprocess.run in its own process group: on a timeout (or pytest-timeout's interrupt) the check's
    compile workers are killed with it instead of compiling on, orphaned."""
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(),
                         start_new_session=True)
    try:
        out, err = p.communicate(timeout=timeout)
    except BaseException:
        os.killpg(p.pid, signal.SIGKILL)
        p.communicate()
        raise
    return subprocess.CompletedProcess(cmd, p.returncode, out, err)


def _env():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    return env


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    """The check's rows, from a fresh process (this one may have imported triton under the interpreter)."""
    out = tmp_path_factory.mktemp("compile") / "rows.json"
    res = _run([sys.executable, str(TOOLS / "triton_compile_check.py"), "--json", str(out)], timeout=1150)
    assert out.exists(), res.stdout[-4000:] + res.stderr[-4000:]
    return json.loads(out.read_text()), res


def test_the_expected_triton_is_the_one_checked(compiled):
    rows, _ = compiled
    want = os.environ.get("FASTPRERL_EXPECT_TRITON")
    if want:
        assert {r["triton"] for r in rows} == {want}


def test_every_kernel_compiles_for_both_targets_without_spills_or_smem_overflow(compiled, capsys):
    rows, res = compiled
    with capsys.disabled():
        print(f"\nTriton {', '.join(sorted({r['triton'] for r in rows}))}: registers / shared memory / spill instructions per kernel, "
              "target, dtype and configuration (max over its entropy / d_h / d_W variants and shapes)")
        print(C.summary(rows))
    assert {(r["spec"]["kernel"], r["arch"], r["dtype"]) for r in rows} == {
        (k, a, d) for k in KERNELS for a in (90, 80) for d in ("bf16", "fp16", "fp32")}
    bad = C.problems(rows)
    assert not bad, "\n".join(bad)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    for r in rows:   # the matrix instructions meant for each target and dtype are there
        if r["sixteen_bit"] and r["arch"] == 90 and r["spec"]["constexprs"]["BLOCK_M"] >= 64:
            assert r["hgmma"] > 0, f"no wgmma in {r['spec']['kernel']} sm_90 {r['config']}"
        elif r["sixteen_bit"]:
            assert r["hmma"] > 0, f"no mma in {r['spec']['kernel']} sm_{r['arch']} {r['config']}"
        else:
            assert r["hmma"] == r["hgmma"] == 0, f"fp32 kernel on tensor cores: {r['spec']['kernel']}"
        assert r["ldgsts"] > 0, f"no cp.async loads in {r['spec']['kernel']} sm_{r['arch']} {r['config']}"


def test_the_check_fails_on_a_spilling_configuration():
    """The control: a configuration that must spill (the sm_80 bf16 forward with a 256 x 128 tile on 4 warps: its
    fp32 accumulator alone is 256 registers per thread, over the 255 of a thread) is reported as a problem, as
    are shared memory over the limit, a compile error and too many fp32 spills."""
    script = """if True:
        import json, sys
        import torch
        sys.path.insert(0, %r)
        import triton_compile_check as C
        from fastprerl.kernels.triton_config import KernelConfig
        from fastprerl.kernels.triton_forward import forward_launch, forward_partials
        meta = torch.device("meta")
        M, H, V = 16384, 2560, 151936
        h = torch.empty((M, H), device=meta, dtype=torch.bfloat16)
        w = torch.empty((V, H), device=meta, dtype=torch.bfloat16)
        t = torch.empty((M,), device=meta, dtype=torch.int64)
        launch = forward_launch(h, w, t, forward_partials(M, 1, meta), V, 1.0, True,
                                KernelConfig(256, 128, 64, num_warps=4, num_stages=3))
        spec = C._spec(launch, 80)
        print(json.dumps({"spec": spec, **C.compile_one(spec)}))
    """ % str(TOOLS)
    res = _run([sys.executable, "-c", script], timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    compiled_row = json.loads(res.stdout.strip().splitlines()[-1])
    spec = compiled_row.pop("spec")
    row = {"spec": spec, **compiled_row, "arch": 80, "dtype": "bf16",
           "sixteen_bit": True, "config": "256x128x64 w4 s3", "flags": "entropy", "smem_limit": C.SMEM_LIMIT[80]}
    assert row["stl"] + row["ldl"] > 0
    assert any("spill instructions in a 16-bit kernel" in p for p in C.problems([row]))
    assert any("shared memory" in p for p in C.problems([{**row, "smem": C.SMEM_LIMIT[80] + 1}]))
    assert any("compile error" in p for p in C.problems([{**row, "error": "boom"}]))
    fp32 = {**row, "sixteen_bit": False, "dtype": "fp32"}
    assert C.problems([{**fp32, "stl": 3, "ldl": 3}]) == []
    assert any("(fp32)" in p for p in C.problems([{**fp32, "stl": C.FP32_SPILL_LIMIT, "ldl": 1}]))


def test_a_timed_out_check_takes_its_workers_with_it(tmp_path):
    """_run kills the whole process group: a worker the check started is gone after the timeout."""
    pidfile = tmp_path / "worker.pid"
    script = ("import subprocess, sys, time; "
              "w = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)']); "
              f"open({str(pidfile)!r}, 'w').write(str(w.pid)); time.sleep(600)")
    with pytest.raises(subprocess.TimeoutExpired):
        _run([sys.executable, "-c", script], timeout=5)
    pid = int(pidfile.read_text())
    with pytest.raises(ProcessLookupError):   # killed, then reaped by init; a live one answers signal 0
        for _ in range(50):
            os.kill(pid, 0)
            time.sleep(0.1)
