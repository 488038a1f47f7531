"""fastprerl.kernels: fused per-token log-probs from hidden states and the LM-head weight.

A library on its own: imports nothing of fastprerl but its own modules.

Where the modules live: in the checkout's top-level ``kernels/`` folder, which has no ``__init__.py`` on
purpose. Hugging Face's ``kernels`` package (a dependency of transformers >= 5.25) owns the top-level name
``kernels``; a folder with an ``__init__.py`` at the checkout's root would shadow it whenever the root is on
``sys.path`` (``python -m pytest``, ``python -m fastprerl``, ``torchrun -m``, a notebook in the checkout),
while a folder without one is only a namespace portion, which an installed package always wins over. This
file is the package; from a checkout its ``__path__`` is the ``kernels/`` folder, and a built wheel copies
the modules next to it (``setup.py``).
"""
from pathlib import Path as _Path

if not (_Path(__file__).parent / "api.py").is_file():  # a checkout (editable install or PYTHONPATH)
    _src = _Path(__file__).resolve().parents[2] / "kernels"
    if not (_src / "api.py").is_file():
        raise ImportError(f"fastprerl.kernels: the kernel modules are not in {_src} (a broken checkout?)")
    __path__ = [str(_src)]

from . import ops  # noqa: E402,F401  (registers the fastprerl:: custom operators)
from .api import IMPLS, TokenLogprobs, resolve_impl, token_logprobs, token_logprobs_no_grad, token_loss  # noqa: E402
from .reference import naive_token_logprobs  # noqa: E402

__all__ = ["IMPLS", "TokenLogprobs", "resolve_impl", "token_logprobs", "token_logprobs_no_grad",
           "token_loss", "naive_token_logprobs"]
