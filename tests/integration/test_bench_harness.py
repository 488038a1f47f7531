"""bench/harness.py checks every case's full outputs against the float64 oracle (bench/bench_oracle.py, the bound
of tests/tolerances.py) and a failed check of a checked case fails the benchmark; the shared RSS meter sees an
allocation. Tiny shapes, each case in its own worker process as in `pytest bench/`."""
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "bench"))
import bench_memory  # noqa: E402
import bench_oracle  # noqa: E402
import harness  # noqa: E402

MODULE = textwrap.dedent('''
    import torch
    import bench_oracle as O
    from fastprerl.kernels import token_logprobs

    def build(case):
        g = torch.Generator().manual_seed(0)
        h = torch.randn(24, 16, generator=g).requires_grad_(True)
        W = (torch.randn(40, 16, generator=g) * 0.3).requires_grad_(True)
        t = torch.randint(0, 40, (24,), generator=g)
        w = torch.rand(24, generator=g) + 0.5
        state = {}

        def fn():
            h.grad = W.grad = None
            lp = token_logprobs(h, W, t, impl="torch").logp
            (w * lp).sum().backward()
            state["logp"] = lp.detach() + case.params.get("planted_error", 0.0)

        def oracle():
            return (O.logprob_outputs(h, W, t, w), O.logprob_outputs(h, W, t, w, dtype=torch.float32),
                    torch.float32)

        return {"fn": fn, "outputs": lambda: {"logp": state["logp"], "grad_h": h.grad, "grad_w": W.grad},
                "oracle": oracle}
''')


def _cases(**params):
    return [harness.Case(bench="harness_test", provider="fastprerl_torch", shape_label="tiny", shape={},
                         params=params, repeats=1, warmup=1, baseline="fastprerl_torch")]


@pytest.fixture()
def module(tmp_path, monkeypatch):
    monkeypatch.setattr(harness, "RESULTS_DIR", tmp_path)
    path = tmp_path / "tiny_bench.py"
    path.write_text(MODULE)
    return str(path)


def test_a_correct_provider_passes_the_oracle_check(module):
    res = harness.run_cases(module, _cases(), verbose=False)
    assert res[0]["status"] == "ok" and res[0]["check"]["ok"], res[0]
    assert set(res[0]["check"]) >= {"logp", "grad_h", "grad_w"}


def test_a_wrong_output_fails_the_benchmark(module, tmp_path):
    with pytest.raises(harness.CheckFailed, match="logp"):
        harness.run_cases(module, _cases(planted_error=1e-3), verbose=False)
    assert "ORACLE CHECK FAILED" in (tmp_path / "harness_test_cpu.md").read_text()


def test_an_unchecked_peer_is_reported_but_does_not_fail(module):
    cases = _cases(planted_error=1e-3)
    cases[0].checked = False
    res = harness.run_cases(module, cases, verbose=False)
    assert not res[0]["check"]["ok"] and "ORACLE CHECK FAILED" in res[0]["note"]


def test_the_bound_is_the_naive_error_plus_the_tolerance():
    import torch
    oracle = {"logp": torch.tensor([-1.0, -2.0], dtype=torch.float64)}
    naive = {"logp": torch.tensor([-1.0, -2.0 + 1e-4], dtype=torch.float64)}
    tol = bench_oracle.load_tolerances()[torch.float32]["logp"]          # 2e-5; scale max(1, 2) = 2
    bound = 1e-4 + tol * 2
    ok = bench_oracle.check({"logp": torch.tensor([-1.0, -2.0 + 0.99 * bound])}, oracle, naive, torch.float32)
    bad = bench_oracle.check({"logp": torch.tensor([-1.0, -2.0 + 1.01 * bound])}, oracle, naive, torch.float32)
    nan = bench_oracle.check({"logp": torch.tensor([-1.0, float("nan")])}, oracle, naive, torch.float32)
    assert ok["ok"] and not bad["ok"] and not nan["ok"]
    assert bad["logp"]["bound"] == pytest.approx(bound)


def test_the_rss_meter_sees_an_allocation():
    meter = bench_memory.RssMeter()
    block = bytearray(64 << 20)
    block[:: 4096] = b"x" * len(block[:: 4096])        # touch every page
    assert meter.summary()["peak_extra_mb"] >= 60
    del block
