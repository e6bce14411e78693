"""A training micro-step reads nothing back from the device: what it needs is found on the host at collate time."""

from __future__ import annotations

import pytest
import torch

from helpers import tiny_overrides
from host_reads import HostReads
from otr_cli.cli import main
from otr_cli.data import IGNORE_INDEX, TokenizedExample, collate_batch
from otr_cli.data.packing import collate_packed
from otr_cli.losses import make_options
from otr_cli.train.batches import loss_weights
from otr_cli.train.micro_batch import micro_batch_to_device, supervised_positions
from otr_cli.train.token_loss_model import TokenLossLM

VOCAB, PAD = 64, 0


def test_the_counter_sees_each_kind_of_host_read_once():
    values = torch.arange(6.0)
    with HostReads() as reads:
        values.sum().item()
        values.tolist()
        float(values[0])
        values.nonzero()
        values[values > 2]
        values.cpu()
        values * 2  # not a read
    assert [name for name, _ in reads.events] == ["item", "tolist", "__float__", "aten.nonzero.default",
                                                  "aten.index.Tensor", "cpu"]


def _engine_micro_step_reads(monkeypatch) -> list[list[tuple[str, str]]]:
    """Host reads of each DeepSpeed forward + backward (one micro-step) made while the test runs."""
    from deepspeed.runtime.engine import DeepSpeedEngine

    per_micro_step: list[list[tuple[str, str]]] = []
    forward, backward = DeepSpeedEngine.forward, DeepSpeedEngine.backward

    def counted_forward(self, *args, **kwargs):
        if not self.module.training:  # validation is not a training micro-step
            return forward(self, *args, **kwargs)
        with HostReads() as reads:
            result = forward(self, *args, **kwargs)
        per_micro_step.append(reads.events)
        return result

    def counted_backward(self, *args, **kwargs):
        with HostReads() as reads:
            result = backward(self, *args, **kwargs)
        per_micro_step[-1].extend(reads.events)
        return result

    monkeypatch.setattr(DeepSpeedEngine, "forward", counted_forward)
    monkeypatch.setattr(DeepSpeedEngine, "backward", counted_backward)
    return per_micro_step


@pytest.mark.slow
@pytest.mark.parametrize("layout,zero", [("padded", 0), ("packed", 0), ("padded", 2), ("padded", 3)])
def test_a_training_micro_step_reads_nothing_back_from_the_device(tiny_model_dir, tmp_path, monkeypatch, layout,
                                                                  zero):
    """Each host read of a device tensor is a GPU synchronisation; the engine's forward and backward of an
    OTR micro-step (decoder, supervised positions, fused loss, packed spans) make none."""
    per_micro_step = _engine_micro_step_reads(monkeypatch)
    main(["train", *tiny_overrides(tiny_model_dir, tmp_path / "run", "loss=otr", "loss.k=4", "trainer.max_steps=2",
                                   "trainer.grad_accum=2", f"deepspeed=zero{zero}",
                                   *(["data.packing=true"] if layout == "packed" else []))])
    assert len(per_micro_step) == 4
    assert [[read for read in reads if "/deepspeed/" not in read[1]] for reads in per_micro_step] == [[]] * 4
    # DeepSpeed's own: ZeRO-3 checks its parameter-fetch trace across ranks while it records it, in the
    # first step only.
    assert per_micro_step[2 if zero == 3 else 0:] == [[]] * (2 if zero == 3 else 4)


def _examples() -> list[TokenizedExample]:
    generator = torch.Generator().manual_seed(0)
    examples = []
    for length, prompt in ((9, 3), (6, 2), (11, 5)):
        ids = torch.randint(1, VOCAB, (length,), generator=generator).tolist()
        examples.append(TokenizedExample(ids, [IGNORE_INDEX] * prompt + ids[prompt:]))
    return examples


@pytest.fixture(scope="module")
def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64, pad_token_id=PAD)
    torch.manual_seed(0)
    return LlamaForCausalLM(config).double()


@pytest.mark.parametrize("packed", [False, True])
def test_supervised_positions_found_on_the_host_give_the_loss_found_on_the_device(tiny_llama, packed):
    """The same OTR draws and loss whether TokenLossLM finds the supervised targets itself or is handed them."""
    host = collate_packed(_examples(), PAD, row_capacity=16) if packed else collate_batch(_examples(), PAD)
    batch = micro_batch_to_device(host, torch.device("cpu"))
    weights = loss_weights(batch.tensors, "token", 20, 3, 1).double()
    options = make_options("otr", k=8, beta=-0.1, reduction="sum", chunk_size=4)
    packed_inputs = {k: batch.tensors[k] for k in ("position_ids", "sequence_index")} if packed else {}
    model = TokenLossLM(tiny_llama)
    tensors = batch.tensors
    on_device = model(tensors["input_ids"], tensors["attention_mask"], tensors["labels"], weights, options,
                      torch.Generator().manual_seed(5), **packed_inputs)
    from_host = model(tensors["input_ids"], tensors["attention_mask"], tensors["labels"], weights, options,
                      torch.Generator().manual_seed(5), **batch.model_kwargs())
    assert batch.supervised.count == int((host["labels"][:, 1:] != IGNORE_INDEX).sum())
    assert torch.equal(batch.supervised.positions,
                       supervised_positions(host["labels"], host["sequence_index"] if packed else None))
    assert float(from_host[0].detach()) == pytest.approx(float(on_device[0].detach()), rel=1e-12)
    assert float(from_host[1]["match_rate"]) == float(on_device[1]["match_rate"])


def test_a_label_outside_the_vocabulary_is_refused_without_reading_the_device(tiny_llama):
    examples = _examples()
    examples[1] = TokenizedExample(examples[1].input_ids, examples[1].labels[:-1] + [VOCAB])
    batch = micro_batch_to_device(collate_batch(examples, PAD), torch.device("cpu"))
    tensors = batch.tensors
    with pytest.raises(ValueError, match=rf"labels must lie in \[0, {VOCAB}\)"):
        TokenLossLM(tiny_llama)(tensors["input_ids"], tensors["attention_mask"], tensors["labels"],
                                loss_weights(tensors, "token", 20, 3, 1).double(), make_options("sft"),
                                **batch.model_kwargs())
