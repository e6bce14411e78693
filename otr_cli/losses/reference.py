"""Naive token losses: materialise all logits, let autograd differentiate.

This is the readable definition of every objective and the yardstick for the fused kernel in tests
and benchmarks. It holds N x V logits (and autograd keeps several more N x V tensors), so it is
not meant for training at real vocabulary sizes.
"""

from __future__ import annotations

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
    summarise_stats,
    loss_call_rows,
    unreachable,
)


def reference_token_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    options: LossOptions | None = None,
    *,
    weights: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    all_supervised: bool = False,
    **knobs,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Same contract as :func:`otr_cli.losses.fused_token_loss`; ``chunk_size`` is accepted and ignored
    (the reference always works on the whole batch at once)."""
    options = options_from(options, knobs)
    hidden, labels, weights = check_inputs(hidden, weight, labels, weights, options.ignore_index)
    rows, count = loss_call_rows(labels, weight.shape[0], options.ignore_index, all_supervised)
    acc_dtype = accumulation_dtype(weight.dtype)

    # A low-precision matmul rounds the logits to that precision, exactly as the fused kernel does.
    logits = (hidden.index_select(0, rows) @ weight.t()).to(acc_dtype)
    targets = labels.index_select(0, rows)
    row_loss, row_stats = _per_row_objective(logits, targets, options, generator)

    row_weights = weights.index_select(0, rows).to(acc_dtype) if weights is not None else torch.ones_like(row_loss)
    loss = (row_weights * row_loss).sum()
    if options.reduction == "mean":
        loss = loss / max(count, 1)
    if count == 0:
        # Keep the (empty) result tied to both inputs, so backward runs and yields zero gradients.
        loss = loss + (hidden.sum() + weight.sum()).to(acc_dtype) * 0
    return loss, summarise_stats(row_stats, count, hidden.device)


def _per_row_objective(
    logits: torch.Tensor, targets: torch.Tensor, options: LossOptions, generator: torch.Generator | None
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Per-position surrogate values l_i [n] (differentiable) and detached per-row statistics.

    logits: [n, V] float32/float64 with grad; targets: [n] int64.
    """
    log_p = torch.log_softmax(logits, dim=1)
    log_p_target = log_p.gather(1, targets.unsqueeze(1)).squeeze(1)
    ce = -log_p_target
    with torch.no_grad():
        p = log_p.exp()
        stats = {"ce": ce.detach(), "p_target": p.gather(1, targets.unsqueeze(1)).squeeze(1), "entropy": -(p * log_p).sum(1)}

    if options.objective == "sft":
        value = ce
    elif options.objective == "dft":
        value = -log_p_target.detach().exp() * log_p_target
    elif options.objective == "otr":
        value = _otr_value(logits, log_p, targets, options, generator, stats)
    else:
        value = _otr_exact_value(logits, log_p, log_p_target, targets, options, stats)
    if options.sft_weight:
        value = value + options.sft_weight * ce
    return value, stats


def _otr_value(logits, log_p, targets, options, generator, stats):
    """Monte Carlo OTR: -(1/K) sum_k A_k log p(a_k) with a_k ~ softmax(z / T), rewards constant."""
    with torch.no_grad():
        shifted = logits - logits.amax(dim=1, keepdim=True)
        weights = rollout_weights(shifted, options.temperature)
        stats["unreachable_frac"] = unreachable(weights.gather(1, targets.unsqueeze(1)).squeeze(1) / weights.sum(1))
        samples = draw_rollouts(weights, options.k, generator)
        rewards = rollout_rewards(samples, targets, options.beta, logits.dtype)
        advantages = rollout_advantages(rewards, options.baseline)
        hits = (samples == targets.unsqueeze(1)).to(logits.dtype)
        stats["match_rate"] = hits.mean(1)
        stats["reward_mean"] = rewards.mean(1)
        stats["no_match_frac"] = (hits.sum(1) == 0).to(logits.dtype)
    return -(advantages * log_p.gather(1, samples)).mean(1)


def _otr_exact_value(logits, log_p, log_p_target, targets, options, stats):
    """Expected OTR surrogate (K -> infinity) with q = softmax(z / T) held constant."""
    beta = options.beta
    with torch.no_grad():
        q = torch.softmax(logits / options.temperature, dim=1)
        q_target = q.gather(1, targets.unsqueeze(1)).squeeze(1)
        stats["match_rate"] = q_target
        stats["reward_mean"] = q_target + beta * (1 - q_target)
        stats["unreachable_frac"] = unreachable(q_target)
    expected_log_p = (q * log_p).sum(1)  # sum_a q_a log p_a
    if options.centred:
        return (1 - beta) * q_target * (expected_log_p - log_p_target)
    return -((1 - beta) * q_target * log_p_target + beta * expected_log_p)
