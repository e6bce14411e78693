"""Which precision a run trains in, and why (said by the dry run and the training log).

One key decides it: ``deepspeed.precision``. ``model.dtype`` is the dtype the weights load in; at
``auto`` it follows the precision, and a ``model.dtype`` that disagrees with an explicit precision is
refused by ``config.validate``. bf16 and fp16 are DeepSpeed's mixed precision: the model computes in
the half dtype while the optimizer updates fp32 master weights (the only way otr trains in a half
dtype: a model loaded in bf16 with DeepSpeed's fp32 mode would update bf16 weights directly and lose
small updates to rounding).

``auto``:
- on a GPU: bf16 when the GPU computes in bf16 (Ampere and later), else fp32;
- on a CPU: fp32. A CPU with AMX bf16 matrix units (Intel Sapphire Rapids and later) trains faster
  in bf16, but a short SFT run ended at a higher validation loss (docs/benchmarks/bench_precision.md),
  and ``auto`` in fp32 gives a recipe the same numbers on every CPU (the tests' and docs/results.md's
  runs included); the choice's reason points such CPUs to deepspeed.precision=bf16.
"""

from __future__ import annotations

from dataclasses import dataclass

from otr_cli.config import DTYPE_OF_PRECISION

PRECISION_OF_DTYPE = {dtype: precision for precision, dtype in DTYPE_OF_PRECISION.items()}


@dataclass(frozen=True)
class PrecisionChoice:
    """precision: "fp32" | "bf16" | "fp16" (DeepSpeed's mode); reason: why, in words, naming the key or the device."""

    precision: str
    reason: str

    @property
    def weights_dtype(self) -> str:
        """The torch dtype name the model loads in: "float32" | "bfloat16" | "float16"."""
        return DTYPE_OF_PRECISION[self.precision]

    @property
    def mixed(self) -> bool:
        return self.precision != "fp32"

    def describe(self) -> str:
        """One line for the dry run and the log, e.g. 'precision: bf16 (fp32 master weights): auto, ...'."""
        how = " (weights and activations in bf16/fp16, fp32 master weights in the optimizer)" if self.mixed else ""
        return f"precision: {self.precision}{how}; {self.reason}"


def choose_precision(requested: str, model_dtype: str, on_gpu: bool, native_bf16: bool) -> PrecisionChoice:
    """The precision of a run (pure: the device's abilities come in as arguments).

    requested: deepspeed.precision ("auto" | "fp32" | "bf16" | "fp16"); model_dtype: model.dtype
    ("auto" | "float32" | "bfloat16" | "float16"; config.validate has refused a disagreeing pair);
    native_bf16: the device multiplies bf16 matrices in hardware (``native_bf16_matmul``).
    """
    if requested != "auto":
        return PrecisionChoice(requested, f"set by deepspeed.precision={requested}")
    if model_dtype != "auto":
        precision = PRECISION_OF_DTYPE[model_dtype]
        return PrecisionChoice(precision, f"deepspeed.precision=auto follows model.dtype={model_dtype}")
    if on_gpu:
        if native_bf16:
            return PrecisionChoice("bf16", "deepspeed.precision=auto on a GPU that computes in bf16")
        return PrecisionChoice("fp32", "deepspeed.precision=auto on a GPU without bf16 support")
    if native_bf16:
        return PrecisionChoice("fp32", "deepspeed.precision=auto on a CPU is fp32, the same numbers on every CPU; "
                                       "this CPU has AMX bf16 matrix units: deepspeed.precision=bf16 trains faster, "
                                       "at a higher validation loss in a short run (docs/benchmarks/bench_precision.md)")
    return PrecisionChoice("fp32", "deepspeed.precision=auto on a CPU is fp32 (this CPU has no AMX bf16 matrix units)")


def cpu_bf16_features() -> dict[str, bool]:
    """{"amx_bf16": ..., "avx512_bf16": ...}: this CPU's bf16 matrix instructions, as torch detects them."""
    import torch

    capabilities = getattr(torch.cpu, "get_capabilities", None)
    found = capabilities() if capabilities is not None else {}
    return {name: bool(found.get(name, False)) for name in ("amx_bf16", "avx512_bf16")}


def native_bf16_matmul(on_gpu: bool) -> bool:
    """Whether the device this process trains on multiplies bf16 matrices in hardware.

    GPU: ``torch.cuda.is_bf16_supported`` without emulation. CPU: AMX bf16 only; avx512_bf16 alone
    was not measured, so such CPUs keep fp32.
    """
    import torch

    if on_gpu:
        return bool(torch.cuda.is_bf16_supported(including_emulation=False))
    return cpu_bf16_features()["amx_bf16"]


def precision_for(cfg, on_gpu: bool) -> PrecisionChoice:
    """The PrecisionChoice of a TrainConfig on this process's device."""
    return choose_precision(cfg.deepspeed.precision, cfg.model.dtype, on_gpu, native_bf16_matmul(on_gpu))
