"""Fused chunked token losses against the naive reference, closed forms and autograd.

Small shapes (N=37 positions, H=16, V=101) and fixed seeds keep the whole file to seconds.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from otr_cli.losses import OBJECTIVES, default_chunk_rows, fused_token_loss, reference_token_loss

N, H, V = 37, 16, 101
IGNORE = -100

# (objective, options) pairs covering every objective, baseline and knob at least once.
CASES = [
    ("sft", {}),
    ("sft", {"sft_weight": 0.5}),
    ("dft", {}),
    ("dft", {"sft_weight": 0.25}),
    ("otr", {"k": 16, "temperature": 1.3, "beta": -0.1}),
    ("otr", {"k": 16, "temperature": 1.0, "beta": 0.0}),
    ("otr", {"k": 16, "temperature": 0.7, "beta": 0.2, "baseline": "mean"}),
    ("otr", {"k": 16, "temperature": 1.3, "beta": -0.1, "baseline": "loo", "sft_weight": 0.3}),
    ("otr_exact", {"temperature": 1.3, "beta": -0.1}),
    ("otr_exact", {"temperature": 1.0, "beta": -0.2}),
    ("otr_exact", {"temperature": 1.3, "beta": -0.1, "baseline": "mean", "sft_weight": 0.3}),
    ("otr_exact", {"temperature": 1.0, "beta": 0.3, "baseline": "loo"}),
]
CASE_IDS = [f"{objective}-" + "-".join(f"{k}={v}" for k, v in options.items()) for objective, options in CASES]


def make_inputs(dtype=torch.float64, n=N, h=H, v=V, seed=0, ignore_every=5):
    """hidden [n, h], weight [v, h] (logits of std ~2), labels [n] with every 5th row ignored."""
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=gen, dtype=torch.float64)
    weight = torch.randn(v, h, generator=gen, dtype=torch.float64) * 0.5
    labels = torch.randint(0, v, (n,), generator=gen)
    if ignore_every:
        labels[::ignore_every] = IGNORE
    return hidden.to(dtype), weight.to(dtype), labels


def run(fn, hidden, weight, labels, seed=1, **kwargs):
    """Call fn on leaf copies, backpropagate; returns (loss, grad_hidden, grad_weight, stats) in float64."""
    hidden = hidden.detach().clone().requires_grad_()
    weight = weight.detach().clone().requires_grad_()
    generator = torch.Generator().manual_seed(seed)
    loss, stats = fn(hidden, weight, labels, generator=generator, **kwargs)
    loss.backward()
    return loss.detach().double(), hidden.grad.double(), weight.grad.double(), stats


def assert_close_rel(actual, expected, tol):
    """Max abs error relative to the largest magnitude of expected (robust for near-zero entries)."""
    scale = expected.abs().max().clamp_min(1e-30)
    error = (actual - expected).abs().max() / scale
    assert error <= tol, f"relative error {error:.3e} > {tol:.1e}"


def assert_runs_agree(a, b, tol, stats_tol=None):
    loss_a, gh_a, gw_a, stats_a = a
    loss_b, gh_b, gw_b, stats_b = b
    assert_close_rel(loss_a, loss_b, tol)
    assert_close_rel(gh_a, gh_b, tol)
    assert_close_rel(gw_a, gw_b, tol)
    assert stats_a.keys() == stats_b.keys()
    for name in stats_a:
        assert abs(float(stats_a[name]) - float(stats_b[name])) <= (stats_tol or tol) * max(1.0, abs(float(stats_b[name]))), name


def identity_head(v=V):
    """weight = I (H = V), so hidden *is* the logits and grad_hidden is dl/dz."""
    return torch.eye(v, dtype=torch.float64)


@pytest.mark.parametrize("objective,options", CASES, ids=CASE_IDS)
def test_fused_matches_reference_in_float64(objective, options):
    hidden, weight, labels = make_inputs()
    weights = torch.rand(N, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    kwargs = dict(objective=objective, weights=weights, chunk_size=8, **options)
    fused = run(fused_token_loss, hidden, weight, labels, **kwargs)
    reference = run(reference_token_loss, hidden, weight, labels, **kwargs)
    assert_runs_agree(fused, reference, 1e-12)
    assert fused[0].abs() > 0 and fused[2].abs().max() > 0


def make_dyadic_inputs(dtype):
    """Like ``make_inputs``, with hidden in multiples of 1/4 and weight in multiples of 1/8.

    Every product is a multiple of 1/32 and every logit a sum of 16 of them below 2^7, which float32
    holds exactly: the logits come out bit-identical whatever order a matmul sums in (chunked or not,
    AVX2 or AVX-512 kernels), so the fused kernel and the reference draw the same OTR rollouts on
    every CPU, and the comparison measures the rounding of the gradients alone. (With arbitrary
    inputs a last-bit difference in one logit can move one uniform across a token boundary.)
    """
    hidden, weight, labels = make_inputs()
    hidden = (hidden * 4).round().clamp(-16, 16) / 4
    weight = (weight * 8).round().clamp(-16, 16) / 8
    return hidden.to(dtype), weight.to(dtype), labels


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.bfloat16, 3e-2)])
@pytest.mark.parametrize("objective,options", CASES[::2], ids=CASE_IDS[::2])
def test_fused_matches_reference_in_low_precision(objective, options, dtype, tol):
    hidden, weight, labels = make_dyadic_inputs(dtype)
    exact_hidden, exact_weight, _ = make_dyadic_inputs(torch.float64)
    assert torch.equal(hidden.double(), exact_hidden) and torch.equal(weight.double(), exact_weight)  # exact in dtype
    fused = run(fused_token_loss, hidden, weight, labels, objective=objective, **options)
    reference = run(reference_token_loss, hidden, weight, labels, objective=objective, **options)
    assert_runs_agree(fused, reference, tol, stats_tol=1e-4)


def test_low_precision_inputs_give_float32_loss_and_input_dtype_grads():
    hidden, weight, labels = make_inputs(torch.bfloat16)
    hidden.requires_grad_()
    weight.requires_grad_()
    loss, _ = fused_token_loss(hidden, weight, labels, objective="otr", k=8)
    loss.backward()
    assert loss.dtype == torch.float32
    assert hidden.grad.dtype == weight.grad.dtype == torch.bfloat16


def test_float64_inputs_stay_float64():
    hidden, weight, labels = make_inputs()
    loss, stats = fused_token_loss(hidden, weight, labels, objective="otr_exact", temperature=1.3)
    assert loss.dtype == torch.float64
    assert all(value.dtype == torch.float32 and value.dim() == 0 for value in stats.values())


def test_sft_matches_torch_cross_entropy():
    hidden, weight, labels = make_inputs()
    fused = run(fused_token_loss, hidden, weight, labels, objective="sft")

    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    loss = F.cross_entropy(h @ w.t(), labels, ignore_index=IGNORE)
    loss.backward()
    assert_close_rel(fused[0], loss.detach(), 1e-13)
    assert_close_rel(fused[1], h.grad, 1e-12)
    assert_close_rel(fused[2], w.grad, 1e-12)
    assert float(fused[3]["ce"]) == pytest.approx(float(loss.detach()), rel=1e-6)


def test_dft_matches_autograd_of_stop_gradient_p_times_log_p():
    hidden, weight, labels = make_inputs()
    fused = run(fused_token_loss, hidden, weight, labels, objective="dft")

    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    keep = labels != IGNORE
    log_p_target = torch.log_softmax(h[keep] @ w.t(), dim=1).gather(1, labels[keep, None]).squeeze(1)
    loss = -(log_p_target.detach().exp() * log_p_target).mean()
    loss.backward()
    assert_close_rel(fused[0], loss.detach(), 1e-13)
    assert_close_rel(fused[1], h.grad, 1e-12)
    assert_close_rel(fused[2], w.grad, 1e-12)


def test_otr_exact_at_temperature_one_and_beta_zero_equals_dft():
    hidden, weight, labels = make_inputs()
    exact = run(fused_token_loss, hidden, weight, labels, objective="otr_exact", temperature=1.0, beta=0.0)
    dft = run(fused_token_loss, hidden, weight, labels, objective="dft")
    assert_close_rel(exact[0], dft[0], 1e-13)
    assert_close_rel(exact[1], dft[1], 1e-12)
    assert_close_rel(exact[2], dft[2], 1e-12)


def closed_form_otr_exact(logits, labels, temperature, beta, centred):
    """(mean value, mean dl/dz [n, V]) of the expected OTR surrogate, straight from the formulas."""
    p = torch.softmax(logits, dim=1)
    q = torch.softmax(logits / temperature, dim=1)
    onehot = F.one_hot(labels, logits.shape[1]).double()
    q_y = (q * onehot).sum(1, keepdim=True)
    log_p = torch.log_softmax(logits, dim=1)
    log_p_y = (log_p * onehot).sum(1)
    expected_log_p = (q * log_p).sum(1)
    if centred:
        value = (1 - beta) * q_y.squeeze(1) * (-log_p_y + expected_log_p)
        grad = (1 - beta) * q_y * (q - onehot)
    else:
        value = -(q_y.squeeze(1) * log_p_y + beta * (expected_log_p - q_y.squeeze(1) * log_p_y))
        grad = (1 - beta) * q_y * (p - onehot) + beta * (p - q)
    n = logits.shape[0]
    return value.mean(), grad / n


@pytest.mark.parametrize("temperature,beta", [(1.3, -0.1), (0.6, 0.4), (2.0, -0.5)])
@pytest.mark.parametrize("baseline", ["none", "mean", "loo"])
def test_otr_exact_matches_closed_form(temperature, beta, baseline):
    logits = torch.randn(N, V, generator=torch.Generator().manual_seed(3), dtype=torch.float64) * 2
    labels = torch.randint(0, V, (N,), generator=torch.Generator().manual_seed(4))
    loss, grad_logits, _, stats = run(
        fused_token_loss, logits, identity_head(), labels,
        objective="otr_exact", temperature=temperature, beta=beta, baseline=baseline,
    )
    value, grad = closed_form_otr_exact(logits, labels, temperature, beta, centred=baseline != "none")
    assert_close_rel(loss, value, 1e-12)
    assert_close_rel(grad_logits, grad, 1e-12)
    q_y = torch.softmax(logits / temperature, dim=1).gather(1, labels[:, None])
    assert float(stats["match_rate"]) == pytest.approx(float(q_y.mean()), rel=1e-6)
    assert float(stats["reward_mean"]) == pytest.approx(float((q_y + beta * (1 - q_y)).mean()), rel=1e-6)


def average_otr_gradient(logits, labels, draws, baseline, seed, k=4, temperature=1.3, beta=-0.2):
    """Mean over `draws` independent OTR estimates of (loss, dl/dz), via one call on replicated rows."""
    leaf = logits.clone().requires_grad_()
    n = logits.shape[0]
    weights = torch.full((n * draws,), 1.0 / (n * draws), dtype=torch.float64)
    loss, _ = fused_token_loss(
        leaf.repeat(draws, 1), identity_head(logits.shape[1]), labels.repeat(draws),
        objective="otr", k=k, temperature=temperature, beta=beta, baseline=baseline,
        weights=weights, reduction="sum", generator=torch.Generator().manual_seed(seed),
    )
    loss.backward()
    return loss.detach(), leaf.grad


@pytest.mark.parametrize(
    "baseline,exact_baseline,factor",
    [("none", "none", 1.0), ("loo", "mean", 1.0), ("mean", "mean", 3 / 4)],  # mean baseline: (K-1)/K bias, K=4
)
def test_otr_monte_carlo_is_unbiased_and_error_shrinks_like_one_over_sqrt_draws(baseline, exact_baseline, factor):
    v = 11  # a small vocabulary, so the target is drawn often and the signal is well above the noise
    logits = torch.randn(6, v, generator=torch.Generator().manual_seed(5), dtype=torch.float64) * 1.5
    labels = torch.randint(0, v, (6,), generator=torch.Generator().manual_seed(6))
    exact_value, exact_grad = closed_form_otr_exact(logits, labels, 1.3, -0.2, centred=exact_baseline != "none")
    exact_value, exact_grad = factor * exact_value, factor * exact_grad

    errors = {}
    for draws in (256, 4096):
        squared = []
        for repeat in range(4):  # RMS over independent repeats steadies the error estimate
            value, grad = average_otr_gradient(logits, labels, draws, baseline, seed=draws + repeat)
            squared.append(float((grad - exact_grad).norm() / exact_grad.norm()) ** 2)
            assert float(value) == pytest.approx(float(exact_value), abs=8 / math.sqrt(draws) * abs(float(exact_value)) + 1e-3)
        errors[draws] = math.sqrt(sum(squared) / len(squared))
    # 16x the draws: the error should drop ~4x (1/sqrt(draws)).
    assert 2.5 < errors[256] / errors[4096] < 6.5, errors
    assert errors[4096] < 0.04, errors


@pytest.mark.parametrize("objective,options", [c for c in CASES if c[0] != "otr"][:6])
def test_deterministic_objectives_do_not_depend_on_chunk_size(objective, options):
    hidden, weight, labels = make_inputs()
    results = [run(fused_token_loss, hidden, weight, labels, objective=objective, chunk_size=chunk, **options)
               for chunk in (1, 5, 64, None)]
    for other in results[1:]:
        assert_runs_agree(other, results[0], 1e-12)


def test_otr_draws_do_not_depend_on_chunk_size():
    hidden, weight, labels = make_inputs()
    options = dict(objective="otr", k=32, temperature=1.3, beta=-0.1)
    one_row = run(fused_token_loss, hidden, weight, labels, chunk_size=1, **options)
    whole = run(fused_token_loss, hidden, weight, labels, chunk_size=N, **options)
    assert_runs_agree(one_row, whole, 1e-12)
    assert float(one_row[3]["match_rate"]) == float(whole[3]["match_rate"])


def test_default_chunk_rows_follows_the_documented_rule():
    assert default_chunk_rows(151936, 896) == 216  # ~128 MiB of logits
    assert default_chunk_rows(49152, 576) == 680
    assert default_chunk_rows(151936, 4096) == 512  # H / 8: a wide head affords more rows
    assert default_chunk_rows(2**24, 64) == 32  # the floor


@pytest.mark.parametrize("objective", OBJECTIVES)
def test_ignored_rows_get_no_gradient_and_do_not_change_the_loss(objective):
    hidden, weight, labels = make_inputs()
    ignored = labels == IGNORE
    options = dict(objective=objective, k=8, beta=-0.1)  # beta != 0: every row gets a signal
    first = run(fused_token_loss, hidden, weight, labels, **options)
    perturbed = hidden.clone()
    perturbed[ignored] += 10.0
    second = run(fused_token_loss, perturbed, weight, labels, **options)
    assert torch.all(first[1][ignored] == 0)
    assert torch.all(first[1][~ignored].abs().sum(1) > 0)
    assert float(first[0]) == float(second[0])


@pytest.mark.parametrize("fn", [fused_token_loss, reference_token_loss])
@pytest.mark.parametrize("objective", OBJECTIVES)
def test_all_ignored_batch_gives_a_connected_zero_loss_and_zero_grads(fn, objective):
    hidden, weight, _ = make_inputs()
    labels = torch.full((N,), IGNORE)
    loss, grad_hidden, grad_weight, stats = run(fn, hidden, weight, labels, objective=objective, k=8)
    assert float(loss) == 0.0
    assert torch.all(grad_hidden == 0) and torch.all(grad_weight == 0)
    assert all(math.isfinite(float(value)) for value in stats.values())
    assert float(stats["count"]) == 0 and float(stats["ce"]) == 0

    h = hidden.clone().requires_grad_()
    zero, _ = fn(h, weight, labels, objective=objective, reduction="sum")
    assert zero.requires_grad and zero.grad_fn is not None


def test_same_generator_state_gives_bit_identical_results():
    hidden, weight, labels = make_inputs(torch.float32)
    options = dict(objective="otr", k=64, temperature=1.3, beta=-0.1)
    a = run(fused_token_loss, hidden, weight, labels, seed=7, **options)
    b = run(fused_token_loss, hidden, weight, labels, seed=7, **options)
    c = run(fused_token_loss, hidden, weight, labels, seed=8, **options)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) and torch.equal(a[2], b[2])
    assert not torch.equal(a[2], c[2])


def test_generator_advances_so_consecutive_calls_draw_fresh_tokens():
    hidden, weight, labels = make_inputs()
    generator = torch.Generator().manual_seed(0)
    first, _ = fused_token_loss(hidden, weight, labels, objective="otr", k=8, beta=-0.1, generator=generator)
    second, _ = fused_token_loss(hidden, weight, labels, objective="otr", k=8, beta=-0.1, generator=generator)
    assert float(first) != float(second)


def test_results_do_not_depend_on_the_thread_count():
    hidden, weight, labels = make_inputs(n=300, v=3000, h=32)  # big enough for parallel kernels
    options = dict(objective="otr", k=64, temperature=1.3, beta=-0.1, chunk_size=128)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        single = run(fused_token_loss, hidden, weight, labels, **options)
        torch.set_num_threads(2)
        double = run(fused_token_loss, hidden, weight, labels, **options)
    finally:
        torch.set_num_threads(threads)
    assert_runs_agree(single, double, 1e-12)
    for name in ("match_rate", "no_match_frac", "unreachable_frac", "reward_mean"):
        assert float(single[3][name]) == float(double[3][name])


@pytest.mark.parametrize("objective", OBJECTIVES)
def test_weights_and_reduction_semantics(objective):
    hidden, weight, labels = make_inputs()
    count = int((labels != IGNORE).sum())
    weights = torch.rand(N, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    options = dict(objective=objective, k=8, temperature=1.3, beta=-0.1)
    mean = run(fused_token_loss, hidden, weight, labels, **options)
    total = run(fused_token_loss, hidden, weight, labels, reduction="sum", **options)
    ones = run(fused_token_loss, hidden, weight, labels, weights=torch.ones(N, dtype=torch.float64), **options)
    weighted = run(fused_token_loss, hidden, weight, labels, weights=weights, reduction="sum", **options)
    assert_close_rel(total[0], mean[0] * count, 1e-13)
    assert_close_rel(total[2], mean[2] * count, 1e-12)
    assert_runs_agree(ones, mean, 1e-13)

    # sum_i w_i l_i: each supervised row alone (reduction="sum") times its weight. The rows draw in
    # order from one generator, so calling them one after another reproduces the batched draws.
    generator = torch.Generator().manual_seed(1)
    expected = sum(
        float(weights[i]) * float(fused_token_loss(hidden[i : i + 1], weight, labels[i : i + 1], reduction="sum",
                                                   generator=generator, **options)[0])
        for i in range(N)
    )
    assert float(weighted[0]) == pytest.approx(expected, rel=1e-12)
    # Unweighted statistics: weights change the loss, not the reported means.
    assert float(weighted[3]["ce"]) == float(mean[3]["ce"]) or objective == "otr"


@pytest.mark.parametrize("objective", OBJECTIVES)
def test_sft_weight_adds_lambda_times_cross_entropy(objective):
    hidden, weight, labels = make_inputs()
    options = dict(objective=objective, k=8, temperature=1.3, beta=-0.1)
    plain = run(fused_token_loss, hidden, weight, labels, **options)
    mixed = run(fused_token_loss, hidden, weight, labels, sft_weight=0.7, **options)
    sft = run(fused_token_loss, hidden, weight, labels, objective="sft")
    for index in range(3):
        assert_close_rel(mixed[index], plain[index] + 0.7 * sft[index], 1e-12)


def test_tied_weight_gets_both_embedding_and_head_gradients():
    gen = torch.Generator().manual_seed(10)
    table = (torch.randn(V, H, generator=gen, dtype=torch.float64) * 0.5).requires_grad_()
    mix = torch.randn(H, H, generator=gen, dtype=torch.float64) / math.sqrt(H)
    tokens = torch.randint(0, V, (N,), generator=gen)
    labels = torch.roll(tokens, -1)
    labels[-1] = IGNORE

    grads = []
    for fn in (fused_token_loss, reference_token_loss):
        table.grad = None
        hidden = torch.tanh(table[tokens] @ mix)  # embedding lookup, then a "body"
        loss, _ = fn(hidden, table, labels, objective="otr", k=8, beta=-0.1, generator=torch.Generator().manual_seed(0))
        loss.backward()
        grads.append(table.grad.clone())
    assert_close_rel(grads[0], grads[1], 1e-12)

    # The head-only gradient differs: the embedding path contributed too.
    hidden = torch.tanh(table[tokens] @ mix).detach()
    head_only = run(fused_token_loss, hidden, table.detach(), labels, objective="otr", k=8, beta=-0.1, seed=0)[2]
    assert (grads[0] - head_only)[tokens].abs().max() > 1e-6


def test_stats_are_detached_unweighted_means():
    hidden, weight, labels = make_inputs()
    keep = labels != IGNORE
    beta = -0.1
    loss, stats = fused_token_loss(hidden.requires_grad_(), weight, labels, objective="otr", k=32, beta=beta,
                                   weights=torch.rand(N, dtype=torch.float64), generator=torch.Generator().manual_seed(0))
    logits = hidden.detach()[keep] @ weight.t()
    log_p = torch.log_softmax(logits, dim=1)
    p = log_p.exp()
    assert all(not value.requires_grad for value in stats.values())
    assert float(stats["count"]) == int(keep.sum())
    assert float(stats["ce"]) == pytest.approx(float(F.cross_entropy(logits, labels[keep])), rel=1e-6)
    assert float(stats["p_target"]) == pytest.approx(float(p.gather(1, labels[keep, None]).mean()), rel=1e-6)
    assert float(stats["entropy"]) == pytest.approx(float(-(p * log_p).sum(1).mean()), rel=1e-6)
    assert float(stats["reward_mean"]) == pytest.approx(beta + (1 - beta) * float(stats["match_rate"]), rel=1e-6)
    assert 0 <= float(stats["no_match_frac"]) <= 1
    assert set(stats) == {"ce", "p_target", "entropy", "match_rate", "reward_mean", "no_match_frac", "unreachable_frac",
                          "count"}


@pytest.mark.parametrize("fn", [fused_token_loss, reference_token_loss], ids=["fused", "reference"])
@pytest.mark.parametrize("objective, temperature", [("otr", 1.0), ("otr", 1.3), ("otr_exact", 1.0), ("otr_exact", 0.7)])
def test_unreachable_frac_counts_targets_with_rollout_probability_under_one_in_a_thousand(fn, objective, temperature):
    # With an identity head the hidden states are the logits, so q(y) = softmax(z / T)[y] is set directly:
    # row i puts logit -s_i on the target and 0 elsewhere, q(y) = 1 / (1 + (V - 1) e^{s_i / T}).
    vocab = 64
    target_logits = torch.linspace(0.0, -6.0, 25, dtype=torch.float64)
    hidden = torch.zeros(25, vocab, dtype=torch.float64)
    labels = torch.arange(25) % vocab
    hidden[torch.arange(25), labels] = target_logits
    q_target = 1.0 / (1.0 + (vocab - 1) * torch.exp(-target_logits / temperature))
    expected = float((q_target < 1e-3).double().mean())
    assert 0.2 < expected < 0.8  # both kinds of row are present
    _, stats = fn(hidden, torch.eye(vocab, dtype=torch.float64), labels, objective=objective, k=4,
                  temperature=temperature, generator=torch.Generator().manual_seed(0))
    assert float(stats["unreachable_frac"]) == pytest.approx(expected, abs=1e-7)


def test_upstream_gradient_scales_the_precomputed_gradients():
    hidden, weight, labels = make_inputs()
    base = run(fused_token_loss, hidden, weight, labels, objective="dft")
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    loss, _ = fused_token_loss(h, w, labels, objective="dft")
    (-2.5 * loss).backward()
    assert_close_rel(h.grad, -2.5 * base[1], 1e-13)
    assert_close_rel(w.grad, -2.5 * base[2], 1e-13)


def test_gradients_only_for_inputs_that_require_them_and_none_under_no_grad():
    hidden, weight, labels = make_inputs()
    w = weight.clone().requires_grad_()
    loss, _ = fused_token_loss(hidden, w, labels, objective="sft")
    loss.backward()
    assert w.grad is not None and hidden.grad is None
    with torch.no_grad():
        again, _ = fused_token_loss(hidden, w, labels, objective="sft")
    assert not again.requires_grad and float(again) == float(loss.detach())


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"objective": "ppo"}, "objective"),
        ({"objective": "otr", "baseline": "median"}, "baseline"),
        ({"objective": "otr", "baseline": "loo", "k": 1}, "loo"),
        ({"objective": "otr", "k": 0}, "k"),
        ({"objective": "otr", "temperature": 0.0}, "temperature"),
        ({"objective": "otr", "beta": 1.0}, "beta"),
        ({"objective": "sft", "sft_weight": -1.0}, "sft_weight"),
        ({"objective": "sft", "reduction": "none"}, "reduction"),
        ({"objective": "sft", "chunk_size": 0}, "chunk_size"),
    ],
)
def test_invalid_options_raise_clear_errors(kwargs, message):
    hidden, weight, labels = make_inputs()
    with pytest.raises(ValueError, match=message):
        fused_token_loss(hidden, weight, labels, **kwargs)


def test_out_of_range_labels_and_mismatched_shapes_raise():
    hidden, weight, labels = make_inputs()
    labels[1] = V
    with pytest.raises(ValueError, match="labels"):
        fused_token_loss(hidden, weight, labels, objective="sft")
    with pytest.raises(ValueError, match="last dimension"):
        fused_token_loss(hidden[:, :-1], weight, labels, objective="sft")
    with pytest.raises(TypeError, match="same dtype"):
        fused_token_loss(hidden.float(), weight, labels, objective="sft")


def test_loss_options_and_keyword_knobs_are_the_same_call():
    from otr_cli.losses import make_options

    hidden, weight, labels = make_inputs()
    knobs = dict(objective="otr", k=8, temperature=1.3, beta=-0.1, chunk_size=8)
    by_keywords = run(fused_token_loss, hidden, weight, labels, **knobs)
    by_options = run(fused_token_loss, hidden, weight, labels, options=make_options(**knobs))
    assert_runs_agree(by_keywords, by_options, 0.0)
    with pytest.raises(TypeError, match="either as options= or as keywords"):
        fused_token_loss(hidden, weight, labels, make_options("sft"), k=8)
