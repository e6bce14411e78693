"""How the fused kernel lays out its work on a device: chunk and block rows, matmul dtypes, syncs.

One job: pure functions of (device type, dtype, V, H, knobs) -> ``KernelPlan``. The kernel
(``fused.py``) follows the plan and decides nothing about devices itself, so the choices are
tested here without a GPU, and a test can force the CUDA plan on CPU to check its numerics.

Why the devices differ (docs/loss.md, "On a GPU"):

* CPU is FLOP-bound and cache-sensitive: the element-wise math runs on blocks of a few MiB
  (``CPU_BLOCK_BYTES``) so that its passes hit the last-level cache (for V = 151936: 6 rows).
* CUDA is launch- and bandwidth-bound: 6-row blocks would mean ~4,400 kernel launches per chunk.
  Blocks there are ``CUDA_BLOCK_BYTES`` (128 MiB of logits, ~220 rows at V = 151936), split
  evenly over the chunk, so each kernel moves tens of MiB and a chunk costs a few hundred launches.
* A bfloat16 GPU runs float32 GEMMs at a fraction of its bf16 speed: on CUDA the weight-gradient
  matmul G^T h takes bf16 operands (float32 accumulation inside the GEMM), as the hidden-state
  gradient G W already does on every device; the [V, H] accumulator across chunks stays float32.
* float16 has a narrow exponent range: the precomputed gradients stay float32 until backward has
  multiplied them by the upstream gradient (which carries DeepSpeed's loss scale), then are cast.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

# Rows handled together by the element-wise math on CPU: a few MiB, so that the handful of passes
# over them (exp, sums, sampling, scaling) hit the CPU's last-level cache instead of main memory.
CPU_BLOCK_BYTES = 4 * 2**20
# On CUDA: large enough that each element-wise kernel moves tens of MiB (launch overhead, ~5 us,
# is then small against its ~25 us of memory traffic on an H200), small enough that the three
# block scratch buffers stay within ~3x the chunk's logits.
CUDA_BLOCK_BYTES = 128 * 2**20
LOW_PRECISION = (torch.bfloat16, torch.float16)
DEVICE_POLICIES = ("cpu", "cuda")


@dataclass(frozen=True)
class KernelPlan:
    """The fused kernel's layout for one call.

    chunk_rows: supervised rows per chunk (one z = h W^T matmul each). block_rows: rows per block
    of the element-wise math (<= chunk_rows). weight_grad_low_precision: G^T h runs with operands
    in the input dtype (bf16/fp16) and float32 accumulation, else in float32. float32_grads:
    the precomputed gradients stay float32 until backward scales them (float16 inputs).
    check_unit_upstream: backward skips the in-place scaling when the upstream gradient is 1
    (a host-device synchronisation, free on CPU, avoided on CUDA where the scaling pass is cheap).
    allow_tf32: float32 matmuls may use TF32 (only affects CUDA float32 inputs).
    """

    chunk_rows: int
    block_rows: int
    weight_grad_low_precision: bool
    float32_grads: bool
    check_unit_upstream: bool
    allow_tf32: bool


def block_rows_for(policy: str, chunk_rows: int, vocab: int, accumulation_bytes: int) -> int:
    """Rows per block of element-wise math for a chunk of ``chunk_rows`` rows of V logits.

    cpu: as many rows as fit in ``CPU_BLOCK_BYTES`` (the last block may be ragged: unchanged
    from the CPU-tuned kernel). cuda: the chunk split into equal blocks of at most
    ``CUDA_BLOCK_BYTES`` (equal, so no block is a short tail of a few rows).
    """
    if policy == "cpu":
        return max(1, min(chunk_rows, CPU_BLOCK_BYTES // (vocab * accumulation_bytes)))
    max_rows = max(1, CUDA_BLOCK_BYTES // (vocab * accumulation_bytes))
    blocks = math.ceil(chunk_rows / max_rows)
    return math.ceil(chunk_rows / blocks)


def device_policy(device: torch.device) -> str:
    """"cuda" for CUDA devices, "cpu" for everything else (CPU, and any device without a CUDA-style
    launch cost that this kernel has been tuned for)."""
    return "cuda" if device.type == "cuda" else "cpu"


def make_plan(policy: str, dtype: torch.dtype, chunk_rows: int, vocab: int, *, allow_tf32: bool = True) -> KernelPlan:
    """The plan for inputs of ``dtype`` under ``policy`` ("cpu" | "cuda").

    chunk_rows: rows per chunk (already capped at the number of supervised rows).
    """
    if policy not in DEVICE_POLICIES:
        raise ValueError(f"policy must be one of {DEVICE_POLICIES}, got {policy!r}")
    accumulation_bytes = 8 if dtype == torch.float64 else 4
    on_cuda = policy == "cuda"
    return KernelPlan(
        chunk_rows=chunk_rows,
        block_rows=block_rows_for(policy, chunk_rows, vocab, accumulation_bytes),
        # float16 is excluded: scaling h by the loss weights (~1 / tokens) before a float16 GEMM
        # would push it into float16's subnormal range; it keeps the float32 GEMM (TF32 allowed).
        weight_grad_low_precision=on_cuda and dtype == torch.bfloat16,
        float32_grads=dtype == torch.float16,
        check_unit_upstream=not on_cuda,
        allow_tf32=allow_tf32,
    )
