"""The fused kernel's per-device plan: the choices as pure functions, and the CUDA layout run on CPU.

The CUDA plan's *selection* is checked here as plain functions; its numerics are checked by forcing
``policy="cuda"`` on CPU inputs, which runs the same blocks, dtypes and backward as on a GPU except
for the CUDA-only GEMM with float32 output (probed, with its bf16 fallback run here instead).
"""

from __future__ import annotations

import os

import pytest
import torch

from otr_cli.losses import fused_token_loss, reference_token_loss
from otr_cli.losses.plan import CPU_BLOCK_BYTES, CUDA_BLOCK_BYTES, block_rows_for, device_policy, make_plan
from test_losses import CASES, CASE_IDS, assert_close_rel, assert_runs_agree, make_dyadic_inputs, make_inputs, run

QWEN_V = 151936
# scripts/gpu_check.py sets this to "cuda" to run the device tests below on the GPU; default: CPU.
LOSS_TEST_DEVICE = os.environ.get("OTR_LOSS_TEST_DEVICE", "cpu")


def test_cpu_blocks_stay_cache_sized_and_cuda_blocks_cover_a_chunk_in_few_even_pieces():
    assert block_rows_for("cpu", 512, QWEN_V, 4) == CPU_BLOCK_BYTES // (QWEN_V * 4) == 6
    assert block_rows_for("cpu", 4, QWEN_V, 4) == 4  # never more than the chunk
    cuda_rows = block_rows_for("cuda", 512, QWEN_V, 4)
    assert cuda_rows * QWEN_V * 4 <= CUDA_BLOCK_BYTES
    assert -(-512 // cuda_rows) == 3 and cuda_rows == 171  # 3 even blocks, not 220 + 220 + 72
    assert block_rows_for("cuda", 256, 49152, 4) == 256  # a whole chunk when it fits
    assert block_rows_for("cuda", 512, QWEN_V, 8) < cuda_rows  # float64 logits take twice the bytes


@pytest.mark.parametrize("dtype,low_precision_weight_grad,float32_grads", [
    (torch.float32, False, False), (torch.bfloat16, True, False), (torch.float16, False, True), (torch.float64, False, False),
])
def test_cuda_plan_picks_matmul_dtypes_by_input_dtype(dtype, low_precision_weight_grad, float32_grads):
    plan = make_plan("cuda", dtype, 512, QWEN_V)
    assert plan.weight_grad_low_precision is low_precision_weight_grad
    assert plan.float32_grads is float32_grads
    assert plan.check_unit_upstream is False  # no torch.equal synchronisation in backward on CUDA


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_cpu_plan_keeps_the_cpu_tuned_kernel(dtype):
    plan = make_plan("cpu", dtype, 512, QWEN_V, allow_tf32=False)
    assert (plan.weight_grad_low_precision, plan.float32_grads, plan.check_unit_upstream) == (False, False, True)
    assert plan.allow_tf32 is False
    assert make_plan("cpu", torch.float16, 512, QWEN_V).float32_grads is True  # fp16 is about range, not speed


def test_device_policy_follows_the_device_type_and_unknown_policies_are_refused():
    assert device_policy(torch.device("cpu")) == "cpu"
    assert device_policy(torch.device("cuda", 3)) == "cuda"
    with pytest.raises(ValueError, match="policy"):
        make_plan("tpu", torch.float32, 8, 100)


@pytest.mark.parametrize("objective,options", CASES, ids=CASE_IDS)
def test_cuda_layout_on_cpu_matches_the_reference_in_float64(objective, options):
    hidden, weight, labels = make_inputs()
    # chunk 16 of 29 supervised rows, V = 101: CUDA blocks are whole chunks, CPU ones also; a tiny
    # vocabulary keeps both. The multi-block CUDA split is checked through block_rows_for above.
    fused = run(fused_token_loss, hidden, weight, labels, objective=objective, chunk_size=16, policy="cuda", **options)
    reference = run(reference_token_loss, hidden, weight, labels, objective=objective, **options)
    assert_runs_agree(fused, reference, 1e-10)


@pytest.mark.parametrize("objective,options", CASES[::2], ids=CASE_IDS[::2])
def test_low_precision_weight_gradient_matches_the_reference_at_bf16_tolerance(objective, options):
    hidden, weight, labels = make_dyadic_inputs(torch.bfloat16)
    fused = run(fused_token_loss, hidden, weight, labels, objective=objective, chunk_size=8, policy="cuda", **options)
    reference = run(reference_token_loss, hidden, weight, labels, objective=objective, **options)
    assert_runs_agree(fused, reference, 3e-2, stats_tol=1e-4)


def test_float16_gradients_with_a_loss_scale_do_not_underflow():
    """Training weights rows by ~1 / (tokens x replicas) and DeepSpeed's fp16 loss scale (2^16)
    arrives as the upstream gradient. Casting the forward gradients to float16 *before* that
    scale (the old order) flushes them to zero; the float32 plan keeps them."""
    hidden, weight, labels = make_dyadic_inputs(torch.float16)
    row_weight, loss_scale = 1e-7, 2.0**16  # e.g. 1 / (64k tokens x grad_accum 16)
    weights = torch.full((labels.numel(),), row_weight, dtype=torch.float32)
    exact_h, exact_w = hidden.double().requires_grad_(), weight.double().requires_grad_()
    loss, _ = reference_token_loss(exact_h, exact_w, labels, objective="sft", reduction="sum", weights=weights.double())
    (loss * loss_scale).backward()
    old_order = (exact_w.grad / loss_scale).half().double() * loss_scale
    assert (old_order == 0).double().mean() > 0.5  # the case: most entries flushed to zero by the old order
    assert (exact_w.grad == 0).double().mean() < 0.05

    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    loss, _ = fused_token_loss(h, w, labels, objective="sft", reduction="sum", weights=weights)
    (loss * loss_scale).backward()
    assert h.grad.dtype == w.grad.dtype == torch.float16
    assert_close_rel(w.grad.double(), exact_w.grad, 2e-3)
    assert_close_rel(h.grad.double(), exact_h.grad, 2e-3)


def test_allow_tf32_is_a_validated_option_that_reaches_the_plan():
    from otr_cli.losses import LossOptionError, make_options

    assert make_options("sft").allow_tf32 is True
    assert make_options("sft", allow_tf32=False).allow_tf32 is False
    with pytest.raises(LossOptionError, match="allow_tf32"):
        make_options("sft", allow_tf32="yes")


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.bfloat16, 3e-2)], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("objective,options", CASES, ids=CASE_IDS)
def test_fused_matches_reference_on_the_test_device(objective, options, dtype, tol):
    """The device's own plan (CPU here, CUDA under gpu_check.py) against the reference on that device.
    TF32 off: this compares the kernels, not TF32's rounding of the logits."""
    if LOSS_TEST_DEVICE == "cuda" and not torch.cuda.is_available():
        pytest.fail("OTR_LOSS_TEST_DEVICE=cuda but torch sees no CUDA device")
    hidden, weight, labels = (t.to(LOSS_TEST_DEVICE) for t in make_dyadic_inputs(dtype))
    fused = run(fused_token_loss, hidden, weight, labels, objective=objective, chunk_size=16, allow_tf32=False, **options)
    reference = run(reference_token_loss, hidden, weight, labels, objective=objective, **options)
    assert_runs_agree(fused, reference, tol, stats_tol=1e-4)


@pytest.mark.parametrize("allow_tf32", [True, False])
def test_tf32_setting_holds_inside_the_cuda_kernel_and_is_restored_after(allow_tf32):
    """The flag is process-wide; only its handling is checked here (no CUDA needed to set it)."""
    from otr_cli.losses.fused import _float32_matmul_precision

    matmul = torch.backends.cuda.matmul
    before = matmul.fp32_precision
    with _float32_matmul_precision(torch.device("cuda"), allow_tf32):
        assert matmul.fp32_precision == ("tf32" if allow_tf32 else "ieee")
    assert matmul.fp32_precision == before
    with _float32_matmul_precision(torch.device("cpu"), allow_tf32):
        assert matmul.fp32_precision == before  # CPU matmuls are left alone
