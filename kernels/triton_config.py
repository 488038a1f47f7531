"""Launch configuration of the Triton kernels: block sizes, warps and pipeline stages per kernel, dtype and
GPU architecture (no autotuning: `@triton.autotune` does not run under the interpreter, and a fixed choice
can be compiled and checked for every target in CI, see tests/integration/test_triton_compile.py).

Kinds: "fwd" (kernels/triton_forward.py), "fwd_expect" (the same kernel with HAS_EXPECT: the frozen-head
forward, which also accumulates E_p[W]), "bwd" (the atomic backward), "bwd_dh" / "bwd_dw" (the
deterministic backward). `default_config` picks one `KernelConfig` per kind from the tables below.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton

from .triton_runtime import interpreting

__all__ = ["KernelConfig", "default_config", "device_arch", "num_sms", "dot_precision", "KINDS"]

KINDS = ("fwd", "fwd_expect", "bwd", "bwd_dh", "bwd_dw")


@dataclass(frozen=True)
class KernelConfig:
    """Block sizes and launch options of one kernel.

    block_m/n/k >= 16 and powers of two (tl.dot). `vocab_splits` (forward only): number of vocabulary
    ranges swept by separate programs; 0 = choose from the device. `group_m` (fast backward only):
    row blocks that share a vocabulary block in the launch order."""
    block_m: int
    block_n: int
    block_k: int
    num_warps: int = 4
    num_stages: int = 2
    group_m: int = 8
    vocab_splits: int = 0

    def __post_init__(self):
        for name in ("block_m", "block_n", "block_k"):
            v = getattr(self, name)
            if v < 16 or v & (v - 1):
                raise ValueError(f"KernelConfig.{name} must be a power of two >= 16, got {v}")
        if self.vocab_splits < 0:
            raise ValueError(f"KernelConfig.vocab_splits must be >= 0, got {self.vocab_splits}")
        if self.group_m < 1:
            raise ValueError(f"KernelConfig.group_m must be >= 1, got {self.group_m}")


# (block_m, block_n, block_k, num_stages) per (architecture family, 16-bit operands?, kind); 8 warps.
# Few rows (M <= 16) take 16-row tiles with 4 warps and block_k <= 32 instead (16-row tiles use mma.sync on
# both targets; wider K slices spill there).
# Chosen by compiling every kernel for sm_90 and sm_80 with Triton 3.6 and 3.9 (tools/triton_compile_check.py
# prints registers / shared memory / spills per configuration) so that no 16-bit kernel spills on either target.
# fp32 operands take the exact IEEE dot (FFMA, no tensor cores); block_k = 16 keeps its operand tiles small
# enough that the fp32 kernels spill at most a few registers. The spill counts behind each choice:
# docs/KERNELS.md.
_TABLE: dict[tuple[str, bool, str], tuple[int, int, int, int]] = {
    # Hopper (sm_90): wgmma (HGMMA) reads its operands from shared memory, so 128-row 16-bit tiles fit
    ("sm90", True, "fwd"): (128, 128, 64, 3),
    ("sm90", True, "bwd"): (128, 128, 64, 3),
    ("sm90", True, "bwd_dh"): (64, 128, 64, 3),
    ("sm90", True, "bwd_dw"): (64, 128, 64, 3),
    ("sm90", False, "fwd"): (64, 128, 16, 3),
    # the frozen-head forward adds exp(z - m) @ W_tile and its fp32 read-modify-write: the forward's 64-wide
    # K slices spill there; 32-wide K slices (sm_90) / 64-row tiles (sm_80) do not
    ("sm90", True, "fwd_expect"): (128, 128, 32, 3),
    ("sm90", False, "fwd_expect"): (64, 128, 16, 3),
    ("sm90", False, "bwd"): (64, 128, 16, 3),
    ("sm90", False, "bwd_dh"): (64, 128, 16, 3),
    ("sm90", False, "bwd_dw"): (64, 128, 16, 3),
    # Ampere (sm_80): mma.sync (HMMA) keeps its operands in registers: 32-wide K slices at 128 rows
    # (64-wide ones spill in the forward with entropy and in the fast backward)
    ("sm80", True, "fwd"): (128, 128, 32, 3),
    ("sm80", True, "bwd"): (128, 128, 32, 3),
    ("sm80", True, "bwd_dh"): (64, 128, 64, 3),
    ("sm80", True, "bwd_dw"): (64, 128, 64, 3),
    ("sm80", False, "fwd"): (64, 128, 16, 3),
    ("sm80", True, "fwd_expect"): (64, 128, 64, 3),
    ("sm80", False, "fwd_expect"): (64, 128, 16, 3),
    ("sm80", False, "bwd"): (64, 128, 16, 3),
    ("sm80", False, "bwd_dh"): (128, 128, 16, 3),
    ("sm80", False, "bwd_dw"): (128, 128, 16, 3),
}


def _pow2_clamp(x: int, lo: int, hi: int) -> int:
    return max(lo, min(hi, triton.next_power_of_2(max(int(x), 1))))


def device_arch(device: torch.device) -> int:
    """Compute capability as an int (90 for H100/H200, 80 for A100); 0 off CUDA."""
    if device.type != "cuda":
        return 0
    major, minor = torch.cuda.get_device_capability(device)
    return 10 * major + minor


def _family(arch: int) -> str:
    return "sm90" if arch >= 90 else "sm80"


def default_config(kind: str, M: int, V: int, H: int, dtype: torch.dtype, device: torch.device,
                   arch: int | None = None) -> KernelConfig:
    """Block sizes for `kind` at M rows (no autotuning). `arch` (e.g. 90, 80) defaults to the device's.

    Interpreter / CPU: blocks large enough to keep the (serial, per-op costly) interpreter quick on test
    shapes. GPU: the table above (16-row tiles for M <= 16); fp32 operands use the exact IEEE dot."""
    if kind not in KINDS:
        raise ValueError(f"unknown kernel kind {kind!r}; expected one of {KINDS}")
    if arch is None:
        if interpreting() or device.type != "cuda":
            return KernelConfig(block_m=_pow2_clamp(M, 16, 32), block_n=_pow2_clamp(V, 16, 128),
                                block_k=_pow2_clamp(H, 16, 64), num_warps=4, num_stages=1, vocab_splits=1)
        arch = device_arch(device)
    block_m, block_n, block_k, stages = _TABLE[(_family(arch), dtype != torch.float32, kind)]
    if M <= 16:   # the frozen-head forward spills at 16 x 128 x 32 (sm_90): 16-wide K slices there
        block_m, block_k, warps = 16, min(block_k, 16 if kind == "fwd_expect" else 32), 4
    else:
        warps = 8
    return KernelConfig(block_m=block_m, block_n=block_n, block_k=block_k, num_warps=warps, num_stages=stages,
                        group_m=8, vocab_splits=0 if kind in ("fwd", "fwd_expect") else 1)


_num_sms_cache: dict = {}


def num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 1
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _num_sms_cache:
        _num_sms_cache[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
    return _num_sms_cache[idx]


def dot_precision(dtype: torch.dtype) -> str:
    """fp32 operands: exact IEEE products (no silent TF32); 16-bit operands: the default tensor cores."""
    return "ieee" if dtype == torch.float32 else "tf32"
