"""Options, validation and the small pieces of math shared by the fused kernel and the reference.

Both implementations draw their OTR rollouts through :func:`rollout_weights` and
:func:`draw_rollouts` and turn rewards into advantages through :func:`rollout_advantages`, so that
with the same generator state they consume the random stream identically and pick the same tokens.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch

OBJECTIVES = ("sft", "dft", "otr", "otr_exact")
BASELINES = ("none", "mean", "loo")
# How the kernel combines per-position losses: "mean" over supervised rows or a weighted "sum".
# (Not the training config's loss.reduction, token | sequence, which sets the row weights.)
KERNEL_REDUCTIONS = ("mean", "sum")
IMPLEMENTATIONS = ("fused", "reference")
SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


class LossOptionError(ValueError):
    """An invalid loss knob; ``field`` names it, so the config layer can report its key path."""

    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field


@dataclass(frozen=True)
class LossOptions:
    """Every knob of the token loss, validated once (see :func:`make_options`).

    The one carrier of loss settings from the config and the objective schedule to the kernels:
    a new knob is a field here, a key in ``LossConfig`` (and ``PhaseConfig`` if a phase may set
    it), and its use in the kernel.

    objective: sft | dft | otr | otr_exact. k: rollouts per position (otr). temperature: the
    rollout policy is softmax(z / temperature). beta: reward of a non-target rollout (< 1).
    baseline: none | mean | loo. sft_weight: λ, adds λ * cross-entropy. ignore_index: label of
    unsupervised rows. reduction: mean | sum over supervised rows. chunk_size: rows per chunk of
    the fused kernel (None: ``default_chunk_rows``). implementation: fused | reference kernel.
    allow_tf32: float32 matmuls of the fused kernel may use TF32 on CUDA (ignored elsewhere).
    """

    objective: str
    k: int = 256
    temperature: float = 1.0
    beta: float = 0.0
    baseline: str = "none"
    sft_weight: float = 0.0
    ignore_index: int = -100
    reduction: str = "mean"
    chunk_size: int | None = None
    implementation: str = "fused"
    allow_tf32: bool = True

    @property
    def samples(self) -> bool:
        """Whether the objective draws rollouts (consumes the generator)."""
        return self.objective == "otr"

    @property
    def centred(self) -> bool:
        """Whether rewards are centred by a baseline (then the advantages sum to zero per row)."""
        return self.baseline in ("mean", "loo")


def _is_count(value) -> bool:
    return not isinstance(value, bool) and isinstance(value, (int, float)) and int(value) == value and value >= 1


def make_options(
    objective: str,
    *,
    k: int = 256,
    temperature: float = 1.0,
    beta: float = 0.0,
    baseline: str = "none",
    sft_weight: float = 0.0,
    ignore_index: int = -100,
    reduction: str = "mean",
    chunk_size: int | None = None,
    implementation: str = "fused",
    allow_tf32: bool = True,
) -> LossOptions:
    """Validate the knobs and freeze them; raises ``LossOptionError`` naming the field and the value."""
    if objective not in OBJECTIVES:
        raise LossOptionError("objective", f"objective must be one of {', '.join(OBJECTIVES)}, got {objective!r}")
    if baseline not in BASELINES:
        raise LossOptionError("baseline", f"baseline must be one of {', '.join(BASELINES)}, got {baseline!r}")
    if reduction not in KERNEL_REDUCTIONS:
        raise LossOptionError("reduction", f"reduction must be one of {', '.join(KERNEL_REDUCTIONS)}, got {reduction!r}")
    if implementation not in IMPLEMENTATIONS:
        raise LossOptionError("implementation",
                              f"implementation must be one of {', '.join(IMPLEMENTATIONS)}, got {implementation!r}")
    if not _is_count(k):
        raise LossOptionError("k", f"k (rollouts per token) must be a positive integer, got {k!r}")
    if objective == "otr" and baseline == "loo" and k < 2:
        raise LossOptionError("baseline", "baseline='loo' needs k >= 2: with one rollout there are no other rewards "
                                          "to average")
    if not (math.isfinite(temperature) and temperature > 0):
        raise LossOptionError("temperature", f"temperature must be a finite number > 0, got {temperature!r}")
    if not (math.isfinite(beta) and beta < 1):
        raise LossOptionError("beta", f"beta (reward of a non-target token) must be finite and < 1 (the target's "
                                      f"reward is 1), got {beta!r}")
    if not (math.isfinite(sft_weight) and sft_weight >= 0):
        raise LossOptionError("sft_weight", f"sft_weight must be finite and >= 0, got {sft_weight!r}")
    if not isinstance(allow_tf32, bool):
        raise LossOptionError("allow_tf32", f"allow_tf32 must be true or false, got {allow_tf32!r}")
    if chunk_size is not None and not _is_count(chunk_size):
        raise LossOptionError("chunk_size", f"chunk_size must be a positive number of rows, got {chunk_size!r}")
    return LossOptions(
        objective=objective,
        k=int(k),
        temperature=float(temperature),
        beta=float(beta),
        baseline=baseline,
        sft_weight=float(sft_weight),
        ignore_index=int(ignore_index),
        reduction=reduction,
        chunk_size=int(chunk_size) if chunk_size is not None else None,
        implementation=implementation,
        allow_tf32=allow_tf32,
    )


def options_from(options: LossOptions | None, knobs: dict) -> LossOptions:
    """The loss functions' settings: a ready ``LossOptions``, or the keyword knobs of :func:`make_options`."""
    if options is None:
        return make_options(**knobs)
    if knobs:
        raise TypeError(f"pass the loss settings either as options= or as keywords, not both (got {sorted(knobs)})")
    return options


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """Logits and statistics dtype: float64 stays float64, everything else becomes float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def rollout_weights(shifted_logits: torch.Tensor, temperature: float, out: torch.Tensor | None = None) -> torch.Tensor:
    """Unnormalised rollout policy q ∝ exp((z - max z) / temperature).

    shifted_logits: [n, V] float32/float64, z - max(z) per row (so the largest entry is exp(0) = 1
    and nothing overflows). Returns [n, V], written into ``out`` when given. With temperature 1 it
    is exactly ``exp(shifted_logits)``, which the fused kernel reuses instead of computing it twice.
    """
    if temperature == 1.0:
        return torch.exp(shifted_logits, out=out)
    scaled = torch.mul(shifted_logits, 1.0 / temperature, out=out)
    return scaled.exp_()


def draw_rollouts(
    weights: torch.Tensor, k: int, generator: torch.Generator | None, *, cdf_out: torch.Tensor | None = None
) -> torch.Tensor:
    """K i.i.d. tokens per row from unnormalised weights [n, V] (with replacement); returns [n, K] int64.

    Inverse-CDF sampling: cumulative sums along V, one uniform per draw scaled by the row total, and
    a binary search. It draws from the same distribution as ``torch.multinomial(weights, k,
    replacement=True)`` at about half its cost on CPU (the cumulative sum runs in parallel over
    rows; multinomial's loop is serial). Properties the kernel and tests rely on:

    * the uniforms come from one ``torch.rand(n, k)`` call, so drawing a matrix in row blocks
      consumes the generator exactly like drawing it at once (chunk-size invariance), and the
      CPU generator is serial, so draws do not depend on the thread count;
    * tokens of zero weight are never drawn (the search returns the first index whose cumulative
      sum exceeds the uniform, and the uniform is kept strictly below the row total).

    cdf_out: optional [n, V] buffer for the cumulative sums; it may be ``weights`` itself.
    """
    cdf = torch.cumsum(weights, dim=1, out=cdf_out)
    totals = cdf[:, -1:]
    # Draw where the generator lives (a CPU generator also serves CUDA tensors), then move.
    draw_device = generator.device if generator is not None else cdf.device
    uniforms = torch.rand(weights.shape[0], k, generator=generator, dtype=cdf.dtype, device=draw_device)
    uniforms = uniforms.to(cdf.device).mul_(totals)
    # u * total can round up to total; keep it below so the search never runs past the end.
    uniforms = torch.minimum(uniforms, torch.nextafter(totals, torch.zeros_like(totals)))
    return torch.searchsorted(cdf, uniforms, right=True)


def rollout_rewards(samples: torch.Tensor, targets: torch.Tensor, beta: float, dtype: torch.dtype) -> torch.Tensor:
    """R_k = 1 where the rollout hit the target, beta otherwise. samples [n, K], targets [n] -> [n, K]."""
    hits = samples == targets.unsqueeze(1)
    return torch.where(hits, torch.ones((), dtype=dtype, device=samples.device), torch.full((), beta, dtype=dtype, device=samples.device))


def rollout_advantages(rewards: torch.Tensor, baseline: str) -> torch.Tensor:
    """Advantages A_k from rewards [n, K].

    none: A = R. mean: A = R - mean(R) (biased by (K-1)/K against the covariance it estimates).
    loo: A_k = R_k - mean of the other K-1 rewards = K/(K-1) (R_k - mean(R)) (unbiased, K >= 2).
    """
    if baseline == "none":
        return rewards
    centred = rewards - rewards.mean(dim=1, keepdim=True)
    if baseline == "mean":
        return centred
    k = rewards.shape[1]
    return centred.mul_(k / (k - 1))


# Per-position statistics the kernels return (means over supervised positions): every objective's,
# then those of the rollout policy (no_match_frac only where rollouts are drawn, i.e. otr).
STAT_NAMES = ("ce", "p_target", "entropy")
ROLLOUT_STAT_NAMES = ("match_rate", "reward_mean", "no_match_frac", "unreachable_frac")


def stat_names(objective: str) -> tuple[str, ...]:
    """The statistics an objective's loss returns (besides ``count``)."""
    if objective == "otr":
        return STAT_NAMES + ROLLOUT_STAT_NAMES
    if objective == "otr_exact":
        return STAT_NAMES + tuple(name for name in ROLLOUT_STAT_NAMES if name != "no_match_frac")
    return STAT_NAMES


# A target the rollout policy draws with probability under this is "unreachable": OTR's gradient
# towards it is weighted by q(y), so the model will not learn it whatever K is (docs/loss.md).
UNREACHABLE_Q = 1e-3


def unreachable(q_target: torch.Tensor) -> torch.Tensor:
    """1.0 where the rollout probability of the target q(y) < ``UNREACHABLE_Q``, else 0.0 (same shape, dtype)."""
    return (q_target < UNREACHABLE_Q).to(q_target.dtype)


def summarise_stats(rows: dict[str, torch.Tensor], count: int, device: torch.device) -> dict[str, torch.Tensor]:
    """Turn per-row statistics into the detached float32 0-dim means returned to callers.

    rows: name -> [n] tensor of per-position values (any float dtype). Means over zero rows are 0,
    never NaN. ``count`` (the number of supervised positions) is returned as a float32 0-dim tensor
    too, so micro-batch results can be combined exactly as sum(stat * count) / sum(count).
    """
    stats = {}
    for name, values in rows.items():
        total = values.detach().to(torch.float64).sum() if values.numel() else torch.zeros((), dtype=torch.float64, device=device)
        stats[name] = (total / max(count, 1)).to(torch.float32)
    # A fill, not torch.tensor(...): a host-to-device copy would wait for the GPU's queue.
    stats["count"] = torch.full((), float(count), dtype=torch.float32, device=device)
    return stats


def supervised_rows(labels: torch.Tensor, vocab: int, ignore_index: int) -> tuple[torch.Tensor, int]:
    """Indices of the supervised rows ([n] int64) and their count n, after checking their labels.

    labels: [N] int64. The one host-device synchronisation of a loss call: the count and the
    number of out-of-range labels come back together, and the count sizes ``nonzero_static``,
    which then needs no synchronisation of its own. Raises ``ValueError`` for a label outside
    [0, V) that is not ``ignore_index``.
    """
    supervised = labels != ignore_index
    out_of_range = supervised & ((labels < 0) | (labels >= vocab))
    count, bad = torch.stack([supervised.sum(), out_of_range.sum()]).tolist()
    if bad:
        raise ValueError(f"labels must lie in [0, {vocab}) or equal ignore_index={ignore_index}")
    if _has_nonzero_static(labels.device.type):
        return torch.nonzero_static(supervised, size=count).squeeze(1), count
    return supervised.nonzero().squeeze(1), count  # a second synchronisation, on builds without it


def all_rows_supervised(count: int, device: torch.device) -> tuple[torch.Tensor, int]:
    """``supervised_rows``'s answer, (arange(count) [n] int64, n), for a caller whose every row is supervised
    with a label it has checked on the host: no synchronisation."""
    return torch.arange(count, device=device), count


def loss_call_rows(labels: torch.Tensor, vocab: int, ignore_index: int, all_supervised: bool) -> tuple[torch.Tensor, int]:
    """The supervised rows of a loss call: ``all_rows_supervised`` when the caller says every row is
    (``all_supervised``), else ``supervised_rows`` (one synchronisation)."""
    if all_supervised:
        return all_rows_supervised(labels.numel(), labels.device)
    return supervised_rows(labels, vocab, ignore_index)


@functools.lru_cache(maxsize=None)
def _has_nonzero_static(device_type: str) -> bool:
    """Whether ``torch.nonzero_static`` runs on this device type (probed once on 2 elements)."""
    try:
        torch.nonzero_static(torch.ones(2, dtype=torch.bool, device=device_type), size=2)
        return True
    except (AttributeError, RuntimeError, NotImplementedError):
        return False


def check_inputs(
    hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor | None, ignore_index: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Validate shapes, dtypes and label range; flatten leading dimensions.

    hidden [..., H] and labels [...] (and weights [...], when given) are flattened to [N, H], [N]
    and [N]. Raises ``ValueError``/``TypeError`` with a message naming the problem. Label values
    are checked by :func:`supervised_rows` (together with the count, in one synchronisation).
    """
    if weight.dim() != 2:
        raise ValueError(f"weight must be [V, H], got shape {tuple(weight.shape)}")
    width = weight.shape[1]
    if hidden.shape[-1] != width:
        raise ValueError(f"hidden's last dimension ({hidden.shape[-1]}) must equal weight's H ({width})")
    if hidden.dtype != weight.dtype:
        raise TypeError(f"hidden ({hidden.dtype}) and weight ({weight.dtype}) must have the same dtype")
    if weight.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"unsupported dtype {weight.dtype}; use one of {SUPPORTED_DTYPES}")
    if labels.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"labels must be an integer tensor (int64), got {labels.dtype}")
    hidden = hidden.reshape(-1, width)
    labels = labels.reshape(-1).long()
    if labels.numel() != hidden.shape[0]:
        raise ValueError(f"labels has {labels.numel()} entries but hidden has {hidden.shape[0]} rows")
    if weights is not None:
        weights = weights.detach().reshape(-1)
        if weights.numel() != labels.numel():
            raise ValueError(f"weights has {weights.numel()} entries but labels has {labels.numel()}")
        if not weights.is_floating_point():
            raise TypeError(f"weights must be a float tensor, got {weights.dtype}")
    return hidden, labels, weights
