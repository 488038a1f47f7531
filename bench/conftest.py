"""Options of `pytest bench/`.

  --quick        tiny sizes, one repeat: checks that every benchmark runs (targets not asserted)
  --full         the bigger shape sets (same as FASTPRERL_BENCH_FULL=1)
  --wait-quiet   before the first benchmark, wait (up to 20 min) until the 1-minute load average is
                 below 0.7, so that timings are not taken on a busy machine
"""
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def pytest_addoption(parser):
    g = parser.getgroup("fastprerl bench")
    g.addoption("--quick", action="store_true", default=False, help="tiny benchmark sizes (smoke run)")
    g.addoption("--full", action="store_true", default=False, help="bigger benchmark shape sets")
    g.addoption("--wait-quiet", action="store_true", default=False,
                help="wait until the 1-minute load average is below 0.7 before benchmarking")


def pytest_configure(config):
    # environment variables, so that the benchmark worker processes see the same choice
    if config.getoption("--quick", default=False):
        os.environ["FASTPRERL_BENCH_QUICK"] = "1"
    if config.getoption("--full", default=False):
        os.environ["FASTPRERL_BENCH_FULL"] = "1"


def pytest_sessionstart(session):
    if session.config.getoption("--wait-quiet", default=False):
        import harness
        seen = harness.wait_quiet()
        print(f"\nload average: {seen}", flush=True)
