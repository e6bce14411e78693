"""data.packing: rows of whole examples, restarting position ids, attention confined to each example,
and the same loss and gradients as unpacked batches of the same examples (data/packing.py)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from otr_cli.config import LossConfig, PhaseConfig, loss_options
from otr_cli.data import IGNORE_INDEX, TokenizedExample, collate_batch
from otr_cli.data.packing import block_causal_mask, collate_packed, pack_rows
from otr_cli.train.batches import loss_weights
from otr_cli.train.packed_attention import VARLEN_SDPA, example_spans, packed_row_capacity, prepare_for_packing
from otr_cli.train.token_loss_model import TokenLossLM, sampling_generator

PAD = 0


def _example(tokens: list[int], prompt: int) -> TokenizedExample:
    """`prompt` unsupervised tokens, the rest supervised."""
    return TokenizedExample(tokens, [IGNORE_INDEX] * prompt + tokens[prompt:])


@pytest.fixture(scope="module")
def examples(tokenizer) -> list[TokenizedExample]:
    """Seven real synthetic-arithmetic chats of 40-90 tokens, with loss weights on one of them."""
    from otr_cli.config import DataConfig
    from otr_cli.data import build_datasets

    data_cfg = DataConfig(max_length=96)
    data_cfg.synthetic.num_train = 7
    data_cfg.synthetic.num_validation = 0
    train = list(build_datasets(data_cfg, tokenizer, seed=3).train)
    weighted = train[2]
    train[2] = dataclasses.replace(weighted, weights=[0.5 if label != IGNORE_INDEX else 0.0 for label in weighted.labels])
    return train


# How packed rows reach each attention kernel (train/packed_attention.py), as (kernel, row capacity):
# sdpa switched to its per-example form takes a micro-batch as one row, or bounded rows with a padding
# tail; plain sdpa and eager take bounded rows with a block-causal mask.
KERNEL_LAYOUTS = {"sdpa per example, one row": (VARLEN_SDPA, None),
                  "sdpa per example, rows of 200": (VARLEN_SDPA, 200),
                  "sdpa with block mask, rows of 200": ("sdpa", 200),
                  "eager with block mask, rows of 200": ("eager", 200)}


@pytest.fixture(scope="module")
def kernel_models(tiny_model_dir) -> dict[str, TokenLossLM]:
    """The tiny model once per attention kernel (the same weights)."""
    from otr_cli.models import load_model

    models = {}
    for kernel in ("sdpa", "eager", VARLEN_SDPA):
        lm = load_model(str(tiny_model_dir), dtype=torch.float32,
                        attn_implementation="eager" if kernel == "eager" else None)
        if kernel == VARLEN_SDPA:
            assert prepare_for_packing(lm) == VARLEN_SDPA
        models[kernel] = TokenLossLM(lm)
    return models


def test_pack_rows_keeps_examples_whole_and_rows_within_capacity_and_balanced():
    lengths = [70, 20, 50, 30, 90, 10, 60]
    rows = pack_rows(lengths, 100)
    assert sorted(i for row in rows for i in row) == list(range(7))
    assert all(sum(lengths[i] for i in row) <= 100 for row in rows)
    assert rows == pack_rows(lengths, 100)  # a pure function of the lengths
    assert len(rows) == 4  # 330 tokens: the minimum, ceil(330 / 100)
    # Rows of similar length (first-fit alone gives 100, 100, 100, 30): less padding to the longest row.
    assert max(sum(lengths[i] for i in row) for row in rows) == 90
    # Where dealing to the shortest row overflows, first-fit's rows stand.
    assert pack_rows([60, 40, 35, 35, 30], 100) == [[0, 1], [2, 3, 4]]
    with pytest.raises(ValueError, match="data.pack_length must be at least data.max_length"):
        pack_rows([101], 100)


def test_packed_position_ids_restart_at_every_example_and_first_tokens_are_unsupervised():
    examples = [_example(list(range(1, 6)), 1), _example(list(range(10, 13)), 0), _example(list(range(20, 28)), 2)]
    batch = collate_packed(examples, PAD, row_capacity=10)
    # Rows: [ex2 (8)], [ex0 (5) + ex1 (3)]; padded to 8.
    assert batch["input_ids"].shape == (2, 8)
    assert batch["position_ids"].tolist() == [list(range(8)), [0, 1, 2, 3, 4, 0, 1, 2]]
    assert batch["sequence_index"].tolist() == [[2] * 8, [0] * 5 + [1] * 3]
    # The first token of each example has no label: the example before it in the row must not predict it.
    assert batch["labels"][1, 5] == IGNORE_INDEX and batch["labels"][1, 6] == 11
    assert batch["attention_mask"].sum() == 16
    padded = collate_packed(examples[:2], PAD, row_capacity=5)
    assert padded["position_ids"][1].tolist() == [0, 1, 2, 0, 1]  # the padding tail restarts too
    assert padded["sequence_index"][1].tolist() == [1, 1, 1, -1, -1]


def test_block_causal_mask_confines_attention_to_each_example():
    sequence_index = torch.tensor([[0, 0, 1, 1, 1, -1]])
    mask = block_causal_mask(sequence_index, "sdpa", torch.float32)[0, 0]
    expected = torch.tensor([[1, 0, 0, 0, 0, 0], [1, 1, 0, 0, 0, 0], [0, 0, 1, 0, 0, 0], [0, 0, 1, 1, 0, 0],
                             [0, 0, 1, 1, 1, 0], [0, 0, 0, 0, 0, 1]], dtype=torch.bool)
    assert torch.equal(mask, expected)
    additive = block_causal_mask(sequence_index, "eager", torch.bfloat16)[0, 0]
    assert additive.dtype == torch.bfloat16
    assert torch.equal(additive == 0, expected)


@pytest.mark.parametrize("layout", list(KERNEL_LAYOUTS))
def test_packed_attention_does_not_leak_across_examples(kernel_models, examples, layout):
    """Changing one example's tokens must not move another's hidden states in the same packed row."""
    kernel, capacity = KERNEL_LAYOUTS[layout]
    model = kernel_models[kernel]
    decoder = model.lm.get_decoder()

    def hidden(batch):
        with torch.no_grad():
            return decoder(input_ids=batch["input_ids"], position_ids=batch["position_ids"],
                           **model._packed_attention_arguments(batch["attention_mask"], batch["sequence_index"],
                                                               torch.float32)).last_hidden_state

    members = examples[:5]
    batch = collate_packed(members, PAD, row_capacity=capacity)
    changed = dataclasses.replace(members[1], input_ids=[(t * 7 + 3) % 1000 for t in members[1].input_ids])
    batch_changed = collate_packed([members[0], changed, *members[2:]], PAD, row_capacity=capacity)
    row_of_changed = int((batch["sequence_index"] == 1).any(dim=1).nonzero()[0])
    assert len(set(batch["sequence_index"][row_of_changed].tolist()) - {-1}) > 1  # it shares its row
    before, after = hidden(batch), hidden(batch_changed)
    real = batch["sequence_index"] >= 0
    others = real & (batch["sequence_index"] != 1)
    assert (after[batch["sequence_index"] == 1] - before[batch["sequence_index"] == 1]).abs().max() > 1e-2
    torch.testing.assert_close(after[others], before[others], rtol=0, atol=1e-6)
    # And each example's hidden states are those of running it alone (float32 rounding only).
    for index, example in enumerate(members):
        with torch.no_grad():
            alone = decoder(input_ids=torch.tensor([example.input_ids])).last_hidden_state[0]
        torch.testing.assert_close(before[batch["sequence_index"] == index], alone, rtol=1e-4, atol=1e-5)


def test_a_micro_batch_is_one_row_without_padding_for_kernels_with_a_variable_length_path(examples):
    from otr_cli.config import DataConfig

    batch = collate_packed(examples, PAD, row_capacity=None)
    assert batch["input_ids"].shape == (1, sum(len(example.input_ids) for example in examples))
    assert bool((batch["sequence_index"] >= 0).all()) and int(batch["attention_mask"].sum()) == batch["input_ids"].numel()
    assert batch["sequence_index"][0].tolist() == [i for i, example in enumerate(examples)
                                                   for _ in example.input_ids]  # in order
    data = DataConfig(max_length=512)
    assert packed_row_capacity(data, VARLEN_SDPA) is None
    assert packed_row_capacity(data, "flash_attention_2") is None
    assert packed_row_capacity(data, "eager") == 512  # its mask is quadratic in the row's length
    data.pack_length = 1024
    assert packed_row_capacity(data, VARLEN_SDPA) == 1024 and packed_row_capacity(data, "eager") == 1024


def test_example_spans_cover_each_row_example_by_example_then_the_padding_tail():
    sequence_index = torch.tensor([[2, 2, 2, 0, 0, -1], [1, 1, 1, 1, 1, 1]])
    assert example_spans(sequence_index) == (((0, 3), (3, 5), (5, 6)), ((0, 6),))


def test_per_example_sdpa_is_plain_sdpa_on_unpacked_batches(kernel_models, examples):
    """Validation batches stay padded: the per-example kernel must give them sdpa's own results."""
    batch = collate_batch(examples, PAD)
    with torch.no_grad():
        outputs = {kernel: kernel_models[kernel].lm.get_decoder()(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
            for kernel in ("sdpa", VARLEN_SDPA)}
    real = batch["attention_mask"].bool()
    assert torch.equal(outputs["sdpa"][real], outputs[VARLEN_SDPA][real])


def test_per_example_sdpa_refuses_sliding_window_layers():
    from otr_cli.config import ConfigError
    from otr_cli.train.packed_attention import sdpa_per_example

    query = torch.zeros(1, 2, 4, 8)
    with pytest.raises(ConfigError, match="sliding-window attention.*model.attn_implementation=eager"):
        sdpa_per_example(torch.nn.Module(), query, query, query, None, packed_spans=(((0, 4),),), sliding_window=2)


def _loss_and_grads(model: TokenLossLM, batch: dict, objective: str, reduction: str):
    """Loss and head/first-layer gradients of one micro-batch that is the whole global batch."""
    model.zero_grad()
    global_tokens = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
    global_sequences = int(batch["sequence_index"].max()) + 1
    weights = loss_weights(batch, reduction, global_tokens, global_sequences, replicas=1)
    options = loss_options(LossConfig(objective=objective, k=8, beta=-0.1, reduction=reduction),
                           PhaseConfig(objective=objective))
    packed = {k: batch[k] for k in ("position_ids", "sequence_index") if "position_ids" in batch}
    generator = sampling_generator(0, 0, 0, 0, torch.device("cpu"))
    loss, stats = model(batch["input_ids"], batch["attention_mask"], batch["labels"], weights, options, generator,
                        **packed)
    loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), stats, grads


@pytest.mark.parametrize("layout", list(KERNEL_LAYOUTS))
@pytest.mark.parametrize("reduction", ["token", "sequence"])
@pytest.mark.parametrize("objective", ["sft", "dft", "otr_exact", "otr"])
def test_packed_and_unpacked_give_the_same_loss_and_gradients(kernel_models, examples, objective, reduction,
                                                               layout):
    """Tolerances: float32 (eps 1.2e-7) summed over ~100-token softmaxes and a few hundred token losses,
    in a different order (rows of other lengths): observed differences are ~1e-6 relative; 1e-4 leaves
    room for other CPUs' vector widths and still fails on any leak (which moves losses by >1e-2).
    OTR samples: the supervised positions reach the kernel in the same order packed and unpacked, so
    the same draws are made; a draw near a probability boundary could flip under rounding, hence
    OTR's wider tolerance."""
    kernel, capacity = KERNEL_LAYOUTS[layout]
    unpacked = collate_batch(examples, PAD)
    packed = collate_packed(examples, PAD, row_capacity=capacity)
    if capacity is not None:
        assert 1 < packed["input_ids"].shape[0] < len(examples)  # several examples per row, several rows
    loss_u, stats_u, grads_u = _loss_and_grads(kernel_models["sdpa"], unpacked, objective, reduction)
    loss_p, stats_p, grads_p = _loss_and_grads(kernel_models[kernel], packed, objective, reduction)
    assert int(stats_p["count"]) == int(stats_u["count"])
    tolerance = 1e-3 if objective == "otr" else 1e-4
    torch.testing.assert_close(loss_p, loss_u, rtol=tolerance, atol=1e-7)
    assert grads_p.keys() == grads_u.keys()
    for name in grads_u:
        scale = grads_u[name].abs().max().item()
        torch.testing.assert_close(grads_p[name], grads_u[name], rtol=0, atol=tolerance * max(scale, 1e-6),
                                   msg=lambda text, name=name: f"{name}: {text}")


def test_per_example_cross_entropy_is_the_same_packed_and_unpacked(kernel_models, examples):
    model = kernel_models[VARLEN_SDPA]
    options = loss_options(LossConfig(objective="sft"), PhaseConfig(objective="sft"))
    packed_rows = collate_packed(examples, PAD, row_capacity=None)
    with torch.no_grad():
        for index, example in enumerate(examples):
            alone = collate_batch([example], PAD)
            _, stats_alone = model(alone["input_ids"], alone["attention_mask"], alone["labels"],
                                   loss_weights(alone, "token", 1, 1, 1), options)
            # The packed micro-batch, with every other example's loss weighted 0.
            only = dict(packed_rows, weights=packed_rows["weights"] * (packed_rows["sequence_index"] == index))
            only["labels"] = torch.where(packed_rows["sequence_index"] == index, packed_rows["labels"], IGNORE_INDEX)
            _, stats_packed = model(only["input_ids"], only["attention_mask"], only["labels"],
                                    loss_weights(only, "token", 1, 1, 1), options,
                                    position_ids=only["position_ids"], sequence_index=only["sequence_index"])
            assert float(stats_packed["count"]) == example.num_supervised
            assert float(stats_packed["ce"]) == pytest.approx(float(stats_alone["ce"]), rel=1e-5)


def test_sequence_reduction_normalises_each_packed_example_by_its_own_tokens():
    examples = [_example([5] * 6, 1), _example([6] * 3, 1), _example([7] * 4, 0)]
    unpacked = loss_weights(collate_batch(examples, PAD), "sequence", 10, 3, 1)
    packed_batch = collate_packed(examples, PAD, row_capacity=13)
    packed = loss_weights(packed_batch, "sequence", 10, 3, 1)
    for index, example in enumerate(examples):
        share = packed[packed_batch["sequence_index"] == index]
        assert share.sum().item() == pytest.approx(1 / 3)  # each example weighs 1 / sequences
        assert share.sum().item() == pytest.approx(unpacked[index].sum().item())
