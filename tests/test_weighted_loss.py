"""Data loss weights through TokenLossLM: fused kernel == reference in float64, weight 0 == no gradient."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from otr_cli.data import IGNORE_INDEX, TokenizedExample, collate_batch
from otr_cli.losses import OBJECTIVES, make_options
from otr_cli.train.batches import loss_weights
from otr_cli.train.token_loss_model import TokenLossLM

VOCAB, PAD = 64, 0


@pytest.fixture(scope="module")
def float64_model():
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
                         tie_word_embeddings=True, pad_token_id=PAD)
    torch.manual_seed(0)
    return LlamaForCausalLM(config).double()


def _example(length: int, supervised_from: int, seed: int, weights=None) -> TokenizedExample:
    ids = torch.randint(1, VOCAB, (length,), generator=torch.Generator().manual_seed(seed)).tolist()
    labels = [IGNORE_INDEX] * supervised_from + ids[supervised_from:]
    return TokenizedExample(ids, labels, weights)


def _weighted(example: TokenizedExample, weight: float) -> TokenizedExample:
    if weight == 0:
        return TokenizedExample(example.input_ids, [IGNORE_INDEX] * len(example.labels))
    return TokenizedExample(example.input_ids, example.labels,
                            [weight if label != IGNORE_INDEX else 0.0 for label in example.labels])


def _loss_and_grads(model, examples, objective, implementation, reduction, seed=0):
    """Loss and parameter gradients of one global batch, weighted as the trainer weights it."""
    tokens = sum(example.num_supervised for example in examples)
    sequences = sum(1 for example in examples if example.num_supervised)
    batch = collate_batch(examples, PAD)
    row_weights = loss_weights(batch, reduction, tokens, sequences, replicas=1).double()
    options = make_options(objective, k=8, temperature=1.3, beta=-0.1, reduction="sum", chunk_size=8,
                           implementation=implementation)
    module = TokenLossLM(model)
    model.zero_grad()
    loss, _ = module(batch["input_ids"], batch["attention_mask"], batch["labels"], row_weights, options,
                     torch.Generator().manual_seed(seed))
    loss.backward()
    return float(loss.detach()), {name: p.grad.clone() for name, p in model.named_parameters()}


@pytest.mark.parametrize("reduction", ["token", "sequence"])
@pytest.mark.parametrize("objective", OBJECTIVES)
def test_weighted_loss_of_the_fused_kernel_equals_the_reference_in_float64(float64_model, objective, reduction):
    examples = [_weighted(_example(12, 4, 1), 1.0), _weighted(_example(9, 3, 2), 2.5),
                _weighted(_example(10, 5, 3), 0.0), _weighted(_example(11, 2, 4), 0.25)]
    fused = _loss_and_grads(float64_model, examples, objective, "fused", reduction)
    reference = _loss_and_grads(float64_model, examples, objective, "reference", reduction)
    assert fused[0] == pytest.approx(reference[0], rel=1e-12)
    for name, grad in fused[1].items():
        torch.testing.assert_close(grad, reference[1][name], rtol=1e-10, atol=1e-13, msg=name)


@pytest.mark.parametrize("reduction", ["token", "sequence"])
def test_weights_multiply_token_losses_over_a_count_normaliser(float64_model, reduction):
    """sft: token = Σ w_t ce_t / N; sequence = Σ_s w_s mean_t(ce) / S (N, S: supervised tokens, sequences)."""
    plain = [_example(12, 4, 1), _example(9, 3, 2)]
    weights = [3.0, 0.5]
    weighted = [_weighted(example, weight) for example, weight in zip(plain, weights)]
    per_example = [_loss_and_grads(float64_model, [example], "sft", "fused", "token")[0] for example in plain]
    loss = _loss_and_grads(float64_model, weighted, "sft", "fused", reduction)[0]
    counts = [example.num_supervised for example in plain]
    if reduction == "token":
        expected = sum(w * ce * n for w, ce, n in zip(weights, per_example, counts)) / sum(counts)
    else:
        expected = sum(w * ce for w, ce in zip(weights, per_example)) / len(plain)
    # loss_weights are float32 (1 / 14 rounds at ~3e-8): the semantics, not float64 exactness, is under test.
    assert loss == pytest.approx(expected, rel=1e-6)
    assert loss != pytest.approx(sum(w * ce for w, ce in zip(weights, per_example)) / sum(weights), rel=1e-3), \
        "not renormalised by the weights' sum"


@pytest.mark.parametrize("objective", OBJECTIVES)
def test_weight_zero_example_gives_zero_gradient_from_its_tokens(float64_model, objective):
    kept = [_example(12, 4, 1), _example(11, 2, 4)]
    dropped = _weighted(_example(10, 5, 3), 0.0)
    assert dropped.num_supervised == 0 and not any(label != IGNORE_INDEX for label in dropped.labels)
    # Padding and position differ, but the weight-0 example adds nothing and moves no normaliser.
    with_it = _loss_and_grads(float64_model, [kept[0], dropped, kept[1]], objective, "fused", "token")
    without = _loss_and_grads(float64_model, kept, objective, "fused", "token")
    if objective != "otr":  # OTR draws per supervised row in order: the same rows, the same draws
        assert with_it[0] == pytest.approx(without[0], rel=1e-12)
    for name, grad in with_it[1].items():
        torch.testing.assert_close(grad, without[1][name], rtol=1e-10, atol=1e-13, msg=name)


def test_a_token_weight_reaches_the_kernel_as_its_row_weight(float64_model):
    example = _example(8, 2, 5)
    weights = [0.0, 0.0] + [float(i) for i in range(1, 7)]
    batch = collate_batch([dataclasses.replace(example, weights=weights)], PAD)
    row_weights = loss_weights(batch, "token", 1, 1, 1)
    assert row_weights[0, 1:].tolist() == weights[1:]
