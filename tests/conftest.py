import os
import sys

import pytest
import torch

pytest_plugins = ["reward_pools"]   # the reward tests' pool fixtures

# Triton fixes the flavour of its standard library (compiled or interpreted) when `triton.language` is first
# imported. Without CUDA the kernel tests run under the interpreter, and several libraries (peft, for one)
# import triton as a side effect; import it interpreted here, first, so that the order in which test modules
# import their libraries does not decide whether the kernel tests can run in this process. Launches still read
# TRITON_INTERPRET at call time (kernels/triton_runtime.py), so the flag is restored afterwards.
if not torch.cuda.is_available() and "triton" not in sys.modules:
    _prev = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        import triton.language  # noqa: F401
    except ImportError:
        pass
    finally:
        if _prev is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = _prev


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny models run faster on one thread than on two when the cores are busy (no OpenMP barriers)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
