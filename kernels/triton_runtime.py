"""Which flavour of Triton runs the kernels (compiled for CUDA, or the CPU interpreter), and how a kernel is
launched.

Triton decorates its own standard library (tl.sum, tl.zeros, ...) when `triton.language` is first
imported, compiled or interpreted according to TRITON_INTERPRET at that moment, and a kernel of the other
flavour cannot call it. So the kernels of this package are decorated with `jit`, which follows the flavour
of Triton's standard library (not the environment at this module's import), and `kernel(fn)`, called at
every launch, raises a RuntimeError naming the cause when TRITON_INTERPRET now asks for the other flavour.
Nested `@jit` helpers (kernels/triton_tiles.py) are then always of the kernel's own flavour.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import torch
import triton.language as tl

__all__ = ["interpreting", "triton_interpreted_at_import", "jit", "kernel", "compute_operands", "Launch"]


def interpreting() -> bool:
    """Whether TRITON_INTERPRET=1 is set now (read at launch time)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def triton_interpreted_at_import() -> bool:
    """Whether `triton.language` was imported with TRITON_INTERPRET=1 (its standard library, e.g.
    tl.sum, is then interpreter-flavoured for the whole process)."""
    from triton.runtime.interpreter import InterpretedFunction
    return isinstance(tl.zeros, InterpretedFunction)


def jit(fn):
    """`triton.jit` in the flavour of Triton's standard library in this process."""
    if triton_interpreted_at_import():
        from triton.runtime.interpreter import InterpretedFunction
        return InterpretedFunction(fn)
    from triton.runtime.jit import JITFunction
    return JITFunction(fn)


def kernel(fn):
    """`fn`, after checking that the TRITON_INTERPRET of now matches the flavour Triton was imported with."""
    want_interp = interpreting()
    if triton_interpreted_at_import() != want_interp:
        raise RuntimeError(
            f"TRITON_INTERPRET is {'1' if want_interp else 'not 1'} now but was "
            f"{'1' if not want_interp else 'not 1'} when triton was first imported in this process; "
            "Triton fixes its standard library at import, so set TRITON_INTERPRET=1 before anything "
            "imports triton (CPU), or leave it unset throughout (GPU)")
    return fn


def compute_operands(h: torch.Tensor, weight: torch.Tensor):
    """Under the interpreter 16-bit tl.dot is unreliable: compute on fp32 copies there."""
    if interpreting() and h.dtype != torch.float32:
        return h.float(), weight.float()
    return h, weight


@dataclass
class Launch:
    """One kernel launch, fully described: the compile check (tools/triton_compile_check.py) builds the
    same objects on meta tensors and compiles `kernel` with the specialisations a launch of `args` gets."""
    kernel: Any
    grid: tuple[int, ...]
    args: tuple[Any, ...]                         # the runtime arguments, in the kernel's order
    constexprs: dict[str, Any] = field(default_factory=dict)
    num_warps: int = 4
    num_stages: int = 2

    def __call__(self) -> None:
        kernel(self.kernel)[self.grid](*self.args, **self.constexprs, num_warps=self.num_warps,
                                       num_stages=self.num_stages)
