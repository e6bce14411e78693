"""Fused chunked linear token losses (sft, dft, otr, otr_exact) that never hold N x V logits.

Layout, from the inside out:

* ``_block_logit_gradient``: the per-row math on a few rows of logits that fit in cache. It turns
  logits z into the logit gradient G = dl/dz in place and returns per-row values and statistics.
* ``fused_loss_and_grads``: the chunk loop. Per chunk of supervised rows: z = h W^T into one
  preallocated buffer, the block math above, then dh = G W and dW += G^T h. The gradients are
  computed here, during the forward pass (as Liger-Kernel does), so no logits survive a chunk.
* ``FusedTokenLossFunction``: the ``torch.autograd.Function``; its backward only scales the
  gradients computed in forward by the upstream gradient.
* ``fused_token_loss``: the user-facing function.

Device-specific choices (block rows, matmul dtypes, float32 gradients for float16) come from a
``KernelPlan`` (``plan.py``); nothing here reads the device type except through it.
"""

from __future__ import annotations

import functools
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from otr_cli.losses.objectives import (
    LossOptions,
    accumulation_dtype,
    check_inputs,
    draw_rollouts,
    options_from,
    rollout_advantages,
    rollout_rewards,
    rollout_weights,
    stat_names,
    summarise_stats,
    loss_call_rows,
    supervised_rows,
    unreachable,
)
from otr_cli.losses.plan import KernelPlan, device_policy, make_plan

# Target size of one chunk of float32 logits (the one big buffer); see ``default_chunk_rows``.
CHUNK_LOGITS_BYTES = 128 * 2**20
MIN_CHUNK_ROWS = 32


def default_chunk_rows(vocab_size: int, hidden_size: int) -> int:
    """Rows per chunk: max(128 MiB of float32 logits, H / 8 rows), a multiple of 8, at least 32.

    Speed depends on the rows per chunk: every chunk streams W ([V, H]) three times and reads and
    writes the float32 weight gradient once, so few rows starve the matmuls (on the 2-core CPU
    measured here, ~100-row chunks ran ~15% slower than 200-500-row chunks). Memory grows with
    rows * V. The first term bounds the buffer at ~128 MiB (216 rows for V = 151936, 680 rows for
    V = 49152); the second lets a wide head use more rows, because its buffer is then still at most
    1/8 of the [V, H] weight gradient the loss returns anyway (512 rows for H = 4096).
    """
    rows = max(CHUNK_LOGITS_BYTES // (4 * vocab_size), hidden_size // 8) // 8 * 8
    return max(MIN_CHUNK_ROWS, rows)


@dataclass
class KernelResult:
    """What one fused pass produces.

    loss: 0-dim, float32 (float64 for float64 inputs). grad_hidden: [N, H] in hidden's dtype or
    None. grad_weight: [V, H] in weight's dtype or None (both for a loss whose upstream gradient
    is 1); float32 instead when the plan keeps ``float32_grads`` (float16 inputs: backward scales
    them, then casts). stats: detached float32 0-dim tensors, on the inputs' device (see
    ``fused_token_loss``).
    """

    loss: torch.Tensor
    grad_hidden: torch.Tensor | None
    grad_weight: torch.Tensor | None
    stats: dict[str, torch.Tensor]


class _Workspace:
    """Buffers allocated once per call and reused by every chunk and block.

    logits: [chunk, V] accumulation dtype, holds z and then G. shifted / rollout / product:
    [block, V] scratch for z - max, for the unnormalised rollout policy and for element-wise
    products and cumulative sums (reused so the block loop allocates nothing of size V). lowp:
    [chunk, V] in the input dtype, only for bfloat16/float16 inputs (matmuls run in the input
    dtype: CPU has no GEMM with a float32 output for bfloat16 operands).
    """

    def __init__(self, chunk_rows: int, block_rows: int, vocab: int, dtype: torch.dtype, device: torch.device,
                 options: LossOptions):
        acc = accumulation_dtype(dtype)
        self.block_rows = block_rows
        self.logits = torch.empty(chunk_rows, vocab, dtype=acc, device=device)
        self.shifted = torch.empty(self.block_rows, vocab, dtype=acc, device=device)
        needs_rollout_buffer = options.objective == "otr" or (options.objective == "otr_exact" and options.temperature != 1.0)
        self.rollout = torch.empty_like(self.shifted) if needs_rollout_buffer else None
        self.product = torch.empty_like(self.shifted)
        self.lowp = torch.empty(chunk_rows, vocab, dtype=dtype, device=device) if dtype != acc else None


def _row_dot(a: torch.Tensor, b: torch.Tensor, scratch: torch.Tensor) -> torch.Tensor:
    """Row-wise dot product of a and b ([b, V] each) through a reused scratch; returns [b, 1]."""
    return torch.mul(a, b, out=scratch).sum(dim=1, keepdim=True)


@dataclass
class _BlockSoftmax:
    """One block's softmax pieces, shared by the objectives' gradient writers.

    exp_shifted: [b, V], exp(z - max z), held in the logits buffer the writer turns into G.
    shifted: [b, V], z - max z. sum_exp, log_sum_exp, log_p_target: [b, 1]. target_col: [b, 1]
    int64. scratch: "rollout", "product" -> [b, V] buffers of the accumulation dtype (rollout is
    None where no rollout policy other than p is needed).
    """

    exp_shifted: torch.Tensor
    shifted: torch.Tensor
    sum_exp: torch.Tensor
    log_sum_exp: torch.Tensor
    log_p_target: torch.Tensor
    target_col: torch.Tensor
    scratch: dict[str, torch.Tensor | None]


def _block_logit_gradient(
    logits: torch.Tensor,
    targets: torch.Tensor,
    scratch: dict[str, torch.Tensor | None],
    options: LossOptions,
    generator: torch.Generator | None,
) -> tuple[torch.Tensor, torch.Tensor | None, dict[str, torch.Tensor]]:
    """Per-row objective on a block of logits; overwrites ``logits`` with the logit gradient.

    logits: [b, V] float32/float64, z on entry, G on exit, where dl_i/dz_i = coef_i * G_i.
    targets: [b] int64. scratch: "shifted", "rollout", "product" -> [b, V] buffers of the same
    dtype (rollout is None for sft/dft and for otr_exact at temperature 1). Returns (value [b],
    coef [b] or None meaning 1, stats name -> [b]).
    """
    target_col = targets.unsqueeze(1)
    shifted = torch.sub(logits, logits.amax(dim=1, keepdim=True), out=scratch["shifted"])  # z - max z
    shifted_target = shifted.gather(1, target_col)
    exp_shifted = torch.exp(shifted, out=logits)  # logits now holds exp(z - max z)
    sum_exp = exp_shifted.sum(dim=1, keepdim=True)
    log_sum_exp = sum_exp.log()
    log_p_target = shifted_target - log_sum_exp  # [b, 1]
    ce = -log_p_target
    p_target = log_p_target.exp()
    # H(p) = log sum e - E_p[z - max z]
    entropy = log_sum_exp - _row_dot(exp_shifted, shifted, scratch["product"]) / sum_exp
    stats = {"ce": ce, "p_target": p_target, "entropy": entropy}
    sft_weight = options.sft_weight

    if options.objective in ("sft", "dft"):
        logits.mul_(1.0 / sum_exp).scatter_add_(1, target_col, torch.full_like(ce, -1.0))  # p - onehot(y)
        coef = (1.0 + sft_weight) * torch.ones_like(ce) if options.objective == "sft" else p_target + sft_weight
        value = coef * ce
    else:
        block = _BlockSoftmax(exp_shifted, shifted, sum_exp, log_sum_exp, log_p_target, target_col, scratch)
        if options.objective == "otr":
            value = _otr_block(block, options, generator, stats) + sft_weight * ce
        else:
            value = _otr_exact_block(block, options, stats) + sft_weight * ce
        coef = None
    return value.squeeze(1), (coef.squeeze(1) if coef is not None else None), {k: v.squeeze(1) for k, v in stats.items()}


def _otr_block(block: _BlockSoftmax, options: LossOptions, generator: torch.Generator | None,
               stats: dict[str, torch.Tensor]) -> torch.Tensor:
    """Monte Carlo OTR on a block: sample, score, and write G = (abar + λ) p - (1/K) Σ A_k e_{a_k} - λ e_y
    into ``block.exp_shifted``; adds the rollout statistics ([b, 1] each) to ``stats``. Returns the
    surrogate value [b, 1].
    """
    logits, shifted, scratch = block.exp_shifted, block.shifted, block.scratch
    log_sum_exp, sum_exp, target_col = block.log_sum_exp, block.sum_exp, block.target_col
    k = options.k
    # With temperature 1 the rollout weights are the logits buffer's own exp(z - max).
    if options.temperature == 1.0:
        weights, sum_weights = logits, sum_exp
    else:
        weights = rollout_weights(shifted, options.temperature, out=scratch["rollout"])
        sum_weights = weights.sum(dim=1, keepdim=True)
    stats["unreachable_frac"] = unreachable(weights.gather(1, target_col) / sum_weights)
    samples = draw_rollouts(weights, k, generator, cdf_out=scratch["product"])  # [b, K]
    log_p_samples = shifted.gather(1, samples) - log_sum_exp
    rewards = rollout_rewards(samples, target_col.squeeze(1), options.beta, logits.dtype)
    advantages = rollout_advantages(rewards, options.baseline)
    hits = (samples == target_col).to(logits.dtype)
    stats["match_rate"] = hits.mean(dim=1, keepdim=True)
    stats["reward_mean"] = rewards.mean(dim=1, keepdim=True)
    stats["no_match_frac"] = (hits.sum(dim=1, keepdim=True) == 0).to(logits.dtype)

    p_coef = advantages.mean(dim=1, keepdim=True) + options.sft_weight
    logits.mul_(p_coef / sum_exp)
    # Duplicated samples accumulate: scatter_add_ builds (1/K) Σ_k A_k onehot(a_k) in place.
    logits.scatter_add_(1, samples, advantages.mul_(-1.0 / k))
    if options.sft_weight:
        logits.scatter_add_(1, target_col, torch.full_like(sum_exp, -options.sft_weight))
    return (advantages * log_p_samples).sum(dim=1, keepdim=True)  # advantages already carry -1/K


def _otr_exact_block(block: _BlockSoftmax, options: LossOptions, stats: dict[str, torch.Tensor]) -> torch.Tensor:
    """Expected OTR on a block (no sampling); writes G into ``block.exp_shifted``.

    baseline none: G = [(1-β) q_y + β + λ] p - β q - [(1-β) q_y + λ] e_y
    baseline mean/loo: G = λ p + (1-β) q_y q - [(1-β) q_y + λ] e_y
    Returns the surrogate value [b, 1].
    """
    logits, shifted, scratch = block.exp_shifted, block.shifted, block.scratch
    log_sum_exp, sum_exp, target_col, log_p_target = block.log_sum_exp, block.sum_exp, block.target_col, block.log_p_target
    beta, sft_weight = options.beta, options.sft_weight
    same_policy = options.temperature == 1.0  # q = p, and q's weights are logits' own entries
    q_weights = logits if same_policy else rollout_weights(shifted, options.temperature, out=scratch["rollout"])
    sum_q = q_weights.sum(dim=1, keepdim=True)
    q_target = q_weights.gather(1, target_col) / sum_q
    expected_log_p = _row_dot(q_weights, shifted, scratch["product"]) / sum_q - log_sum_exp  # Σ_a q_a log p_a
    stats["match_rate"] = q_target
    stats["reward_mean"] = q_target + beta * (1.0 - q_target)
    stats["unreachable_frac"] = unreachable(q_target)

    target_coef = (1.0 - beta) * q_target + sft_weight
    if options.centred:
        value = (1.0 - beta) * q_target * (expected_log_p - log_p_target)
        p_coef, q_coef = torch.full_like(sum_q, sft_weight), (1.0 - beta) * q_target
    else:
        value = -((1.0 - beta) * q_target * log_p_target + beta * expected_log_p)
        p_coef, q_coef = target_coef + beta, torch.full_like(sum_q, -beta)
    if same_policy:
        logits.mul_((p_coef + q_coef) / sum_exp)
    else:
        logits.mul_(p_coef / sum_exp).addcmul_(q_weights, q_coef / sum_q)
    logits.scatter_add_(1, target_col, -target_coef)
    return value


def _chunk_logit_gradient(logits, targets, workspace, options, generator):
    """Run the block math over a chunk; returns (value [n], coef [n] or None, stats name -> [n])."""
    values, coefs, stats = [], [], {}
    step = workspace.block_rows
    for start in range(0, logits.shape[0], step):
        stop = min(start + step, logits.shape[0])
        rows = stop - start
        scratch = {name: getattr(workspace, name)[:rows] if getattr(workspace, name) is not None else None
                   for name in ("shifted", "rollout", "product")}
        value, coef, block_stats = _block_logit_gradient(logits[start:stop], targets[start:stop], scratch, options, generator)
        values.append(value)
        coefs.append(coef)
        for name, row_values in block_stats.items():
            stats.setdefault(name, []).append(row_values)
    coef = torch.cat(coefs) if coefs[0] is not None else None
    return torch.cat(values), coef, {name: torch.cat(parts) for name, parts in stats.items()}


def _logits_into(out: torch.Tensor, hidden_rows: torch.Tensor, weight: torch.Tensor, lowp: torch.Tensor | None) -> None:
    """out [n, V] (accumulation dtype) = hidden_rows [n, H] @ weight[V, H]^T."""
    if lowp is None:
        torch.mm(hidden_rows, weight.t(), out=out)
    else:
        out.copy_(torch.mm(hidden_rows, weight.t(), out=lowp[: out.shape[0]]))


@functools.lru_cache(maxsize=None)
def _has_float32_output_gemm(device_type: str, dtype: torch.dtype) -> bool:
    """Whether ``torch.addmm(..., out_dtype=torch.float32)`` runs for ``dtype`` operands on this
    device type (CUDA builds of torch >= 2.8; not CPU). Probed once on a 2 x 2 problem."""
    try:
        acc = torch.zeros(2, 2, dtype=torch.float32, device=device_type)
        operand = torch.ones(2, 2, dtype=dtype, device=device_type)
        torch.addmm(acc, operand, operand, out_dtype=torch.float32, out=acc)
        return True
    except (RuntimeError, TypeError, NotImplementedError):
        return False


def _add_weight_grad(grad_weight: torch.Tensor | None, grad_logits: torch.Tensor, hidden_rows: torch.Tensor,
                     vocab: int) -> torch.Tensor:
    """grad_weight [V, H] float32 += grad_logits^T [V, n] @ hidden_rows [n, H]; allocates on first use.

    Operands in float32/float64: a plain (add)mm. Operands in bfloat16: one GEMM with bf16 inputs
    and float32 accumulation into the float32 accumulator where the device has it (CUDA), else a
    bf16 GEMM (float32 accumulation inside, one bf16 rounding of the chunk's product) added in.
    """
    if grad_logits.dtype == grad_weight_dtype(grad_logits.dtype):
        if grad_weight is None:
            return torch.mm(grad_logits.t(), hidden_rows)
        return grad_weight.addmm_(grad_logits.t(), hidden_rows)
    if grad_weight is None:
        grad_weight = torch.zeros(vocab, hidden_rows.shape[1], dtype=torch.float32, device=hidden_rows.device)
    if _has_float32_output_gemm(grad_weight.device.type, grad_logits.dtype):
        return torch.addmm(grad_weight, grad_logits.t(), hidden_rows, out_dtype=torch.float32, out=grad_weight)
    return grad_weight.add_(torch.mm(grad_logits.t(), hidden_rows))


def grad_weight_dtype(dtype: torch.dtype) -> torch.dtype:
    """The weight-gradient accumulator's dtype for operands of ``dtype``: float64 stays, else float32."""
    return accumulation_dtype(dtype)


def _grad_times_weight(grad_logits: torch.Tensor, weight: torch.Tensor, lowp: torch.Tensor | None) -> torch.Tensor:
    """G [n, V] @ weight [V, H] -> [n, H] (in weight's dtype for low-precision inputs)."""
    if lowp is None:
        return torch.mm(grad_logits, weight)
    rows = lowp[: grad_logits.shape[0]]
    rows.copy_(grad_logits)
    return torch.mm(rows, weight)


def fused_loss_and_grads(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    row_weights: torch.Tensor | None,
    options: LossOptions,
    generator: torch.Generator | None,
    plan: KernelPlan,
    need_hidden_grad: bool,
    need_weight_grad: bool,
    supervised: tuple[torch.Tensor, int] | None = None,
) -> KernelResult:
    """Loss, statistics and both gradients in one chunked pass (plain function, no autograd).

    hidden: [N, H], weight: [V, H] (same dtype), labels: [N] int64, row_weights: [N] float or None.
    Only rows whose label is not ``options.ignore_index`` are multiplied with W; the others get
    zero gradient. plan: chunk and block rows and matmul dtypes (``plan.make_plan``).
    supervised: (row indices [n], n) from ``supervised_rows`` when the caller has them already.
    Synchronises with the device once (``supervised_rows``) unless ``supervised`` is given.
    """
    device = hidden.device
    acc = accumulation_dtype(weight.dtype)
    rows, count = supervised if supervised is not None else supervised_rows(labels, weight.shape[0], options.ignore_index)
    scale = 1.0 / max(count, 1) if options.reduction == "mean" else 1.0
    chunk_rows = plan.chunk_rows

    loss = torch.zeros((), dtype=acc, device=device)
    grads_dtype = torch.float32 if plan.float32_grads else hidden.dtype
    grad_hidden = torch.zeros(hidden.shape, dtype=grads_dtype, device=device) if need_hidden_grad else None
    grad_weight = None  # float accumulator [V, H], allocated by the first chunk's matmul
    row_stats: dict[str, list[torch.Tensor]] = {}
    block_rows = min(plan.block_rows, chunk_rows, count) if count else 1
    workspace = _Workspace(min(chunk_rows, count), block_rows, weight.shape[0], weight.dtype, device, options) if count else None

    # Equal chunks: a ragged last chunk of a few rows would run its three matmuls at poor efficiency.
    step = -(-count // -(-count // chunk_rows)) if count else chunk_rows
    for start in range(0, count, step):
        chunk = rows[start : start + step]
        hidden_rows = hidden.index_select(0, chunk)
        logits = workspace.logits[: chunk.numel()]
        _logits_into(logits, hidden_rows, weight, workspace.lowp)
        value, coef, stats = _chunk_logit_gradient(logits, labels.index_select(0, chunk), workspace, options, generator)

        loss_weight = row_weights.index_select(0, chunk).to(acc) * scale if row_weights is not None else torch.full_like(value, scale)
        loss += (loss_weight * value).sum()
        grad_scale = (loss_weight * coef if coef is not None else loss_weight).unsqueeze(1)  # dl/dz_i = grad_scale_i G_i
        lowp_grad = None  # G in the input dtype, once _grad_times_weight has copied it there
        if need_hidden_grad:
            grad_rows = _grad_times_weight(logits, weight, workspace.lowp)
            lowp_grad = workspace.lowp[: chunk.numel()] if workspace.lowp is not None else None
            # float16: scale in float32 (a tiny loss weight would underflow in float16)
            grad_rows = grad_rows.to(grads_dtype).mul_(grad_scale.to(grads_dtype))
            grad_hidden.index_copy_(0, chunk, grad_rows)
        if need_weight_grad:
            if plan.weight_grad_low_precision and workspace.lowp is not None:
                if lowp_grad is None:
                    lowp_grad = workspace.lowp[: chunk.numel()].copy_(logits)
                scaled_hidden = (hidden_rows.to(acc) * grad_scale).to(hidden.dtype)
                grad_weight = _add_weight_grad(grad_weight, lowp_grad, scaled_hidden, weight.shape[0])
            else:
                grad_weight = _add_weight_grad(grad_weight, logits, hidden_rows.to(acc) * grad_scale, weight.shape[0])
        for name, values in stats.items():
            row_stats.setdefault(name, []).append(values)

    if need_weight_grad:
        final_dtype = grad_weight_dtype(weight.dtype) if plan.float32_grads else weight.dtype
        grad_weight = torch.zeros(weight.shape, dtype=final_dtype, device=device) if grad_weight is None else grad_weight.to(final_dtype)
    merged = {name: torch.cat(parts) for name, parts in row_stats.items()}
    if count == 0:
        merged = {name: torch.zeros(0, device=device) for name in stat_names(options.objective)}
    return KernelResult(loss, grad_hidden, grad_weight, summarise_stats(merged, count, device))


@contextmanager
def _float32_matmul_precision(device: torch.device, allow_tf32: bool):
    """CUDA float32 matmuls inside use TF32 when ``allow_tf32``, else full float32; the previous
    global setting is restored on exit. Does nothing on other devices."""
    if device.type != "cuda":
        yield
        return
    matmul = torch.backends.cuda.matmul
    # torch >= 2.9 has fp32_precision and raises when a later read of the legacy allow_tf32 finds
    # the two disagreeing; setting and restoring through the same API as the one read keeps them
    # consistent for the caller.
    name, value = (("fp32_precision", "tf32" if allow_tf32 else "ieee") if hasattr(matmul, "fp32_precision")
                   else ("allow_tf32", allow_tf32))
    previous = getattr(matmul, name)
    setattr(matmul, name, value)
    try:
        yield
    finally:
        setattr(matmul, name, previous)


class FusedTokenLossFunction(torch.autograd.Function):
    """Autograd wrapper: gradients are computed in forward, backward only scales them.

    The gradients are kept on ``ctx`` (not ``save_for_backward``) and handed over in backward, so
    autograd can adopt the V x H weight gradient without copying it; as a consequence backward can
    run once per forward (the loss is sampled anyway: a second backward would need the same draws).
    """

    @staticmethod
    def forward(ctx, hidden, weight, labels, row_weights, options, generator, plan, stats_out, supervised):
        with _float32_matmul_precision(hidden.device, plan.allow_tf32):
            result = fused_loss_and_grads(
                hidden,
                weight,
                labels,
                row_weights,
                options,
                generator,
                plan,
                need_hidden_grad=ctx.needs_input_grad[0],
                need_weight_grad=ctx.needs_input_grad[1],
                supervised=supervised,
            )
        stats_out.update(result.stats)
        ctx.grads = (result.grad_hidden, result.grad_weight)
        ctx.plan = plan
        ctx.dtypes = (hidden.dtype, weight.dtype)
        return result.loss

    @staticmethod
    def backward(ctx, grad_loss):
        if ctx.grads is None:
            raise RuntimeError("fused_token_loss: backward can run only once per forward (gradients are precomputed)")
        grad_hidden, grad_weight = ctx.grads
        ctx.grads = None
        plan = ctx.plan
        # On CPU the comparison is free and saves a pass over [V, H] in the common unit case; on
        # CUDA it would be a synchronisation, and the pass costs well under a millisecond.
        # float32_grads: the (loss-scaled) upstream gradient is applied before the float16 cast.
        unit = plan.check_unit_upstream and not plan.float32_grads and torch.equal(grad_loss, torch.ones_like(grad_loss))
        if not unit:
            # In place: the precomputed gradients are used once (see above), and a scaled copy of
            # the [V, H] weight gradient would double the loss's peak memory (DeepSpeed scales the
            # loss by 1 / grad_accum, so this is the common case in training).
            if grad_hidden is not None:
                grad_hidden.mul_(grad_loss.to(grad_hidden.dtype))
            if grad_weight is not None:
                grad_weight.mul_(grad_loss.to(grad_weight.dtype))
        if plan.float32_grads:
            hidden_dtype, weight_dtype = ctx.dtypes
            grad_hidden = grad_hidden.to(hidden_dtype) if grad_hidden is not None else None
            grad_weight = grad_weight.to(weight_dtype) if grad_weight is not None else None
        return grad_hidden, grad_weight, None, None, None, None, None, None, None


def fused_token_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    options: LossOptions | None = None,
    *,
    weights: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    policy: str | None = None,
    all_supervised: bool = False,
    **knobs,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Token loss of an LM head without materialising the logits.

    hidden: [N, H] (or [..., H]) final hidden states; weight: [V, H] LM head (for tied embeddings
    the embedding matrix itself); labels: [N] int64 targets, ``ignore_index`` for unsupervised
    rows. Same dtype for hidden and weight: float32, bfloat16, float16 or float64. Logits, softmax
    and statistics are computed in float32 (float64 for float64 inputs).

    options: a validated ``LossOptions`` (what training passes), or instead its fields as keywords
    (``objective="otr", k=8, beta=-0.1, ...``, validated by ``make_options``): objective "sft" |
    "dft" | "otr" | "otr_exact"; k, temperature, beta, baseline: OTR rollouts (K samples per
    position from softmax(z / temperature), reward 1 on the target and beta elsewhere, baseline
    "none" | "mean" | "loo"); sft_weight: λ, adds λ * cross-entropy; reduction "mean":
    sum_i w_i l_i / n_sup, "sum": sum_i w_i l_i; chunk_size: rows per chunk (default
    ``default_chunk_rows(V, H)``). weights: optional [N] per-row weights (constants).
    generator: drives every draw (same state -> same result). policy: "cpu" | "cuda", the
    layout of ``plan.make_plan`` (None: from the inputs' device; forcing "cuda" on CPU runs the
    GPU layout there, for tests and benchmarks). ``allow_tf32`` (default true) lets CUDA float32
    matmuls use TF32.

    Returns (loss, stats): loss is a 0-dim float32 (float64) tensor; stats holds detached float32
    0-dim tensors: ce, p_target, entropy (unweighted means over supervised positions), for otr
    match_rate, reward_mean, no_match_frac, unreachable_frac, for otr_exact match_rate,
    reward_mean, unreachable_frac; and count. unreachable_frac: the fraction of positions whose
    target has rollout probability q(y) < ``UNREACHABLE_Q`` (1e-3). The statistics stay on the
    device: reading one (``float(...)``) synchronises, so callers read them once per logged step.
    One host-device synchronisation per call (the count of supervised rows, read with the label check),
    none with ``all_supervised=True``: the caller vouches that every label is a target in [0, V) (checked
    on the host; TokenLossLM passes only supervised rows), so the count is N, known without the device.
    """
    options = options_from(options, knobs)
    hidden, labels, weights = check_inputs(hidden, weight, labels, weights, options.ignore_index)
    supervised = loss_call_rows(labels, weight.shape[0], options.ignore_index, all_supervised)
    chunk_rows = options.chunk_size or default_chunk_rows(weight.shape[0], weight.shape[1])
    plan = make_plan(policy or device_policy(hidden.device), weight.dtype, min(chunk_rows, max(supervised[1], 1)),
                     weight.shape[0], allow_tf32=options.allow_tf32)
    stats: dict[str, torch.Tensor] = {}
    loss = FusedTokenLossFunction.apply(hidden, weight, labels, weights, options, generator, plan, stats, supervised)
    return loss, stats
