"""Fixtures of the reward tests (a plugin of tests/conftest.py): a module's own verification pool, and the stop of
the shared pool when a module that asks for it (`stop_shared_pool`) is done."""
import pytest

from fastprerl.rewards import RewardPool, shutdown

ALIVE = (r"\boxed{\frac{\sqrt{2}}{2}}", r"\sqrt{2}/2")   # a symbolic pair that needs sympy: the pool still answers


@pytest.fixture(scope="module")
def pool():
    with RewardPool(workers=2, timeout=5.0) as p:
        yield p


@pytest.fixture(scope="module")
def stop_shared_pool():
    """The module-level functions and the registry share one pool; stop it when this file is done."""
    yield
    shutdown()
