"""The one tolerance table of the test suite.

Bound used everywhere: |impl - float64 oracle| <= |naive same dtype - oracle| + TOL[dtype][quantity],
elementwise maxima. The naive computation's own error is the yardstick; TOL only absorbs rounding
that a different (but equally valid) summation order can add on top.
"""
import torch

TOL = {
    torch.float32: {"logp": 2e-5, "entropy": 2e-5, "grad": 1e-5},
    torch.bfloat16: {"logp": 2e-2, "entropy": 2e-2, "grad": 2e-2},
    torch.float16: {"logp": 5e-3, "entropy": 5e-3, "grad": 5e-3},
}


def max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0
