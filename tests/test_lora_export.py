"""LoRA checkpoints: the merged model and the adapter, under ZeRO-0 and ZeRO-3 (2 gloo ranks), and resume.

Runs the tiny random Qwen3-architecture model. ZeRO-3 keeps parameters under
``stage3_param_persistence_threshold`` (1e5 elements) whole on every rank, which at this size is
every projection: the threshold is set to 0 so that every parameter is partitioned, as it is for
an 8B model.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from helpers import read_jsonl, tiny_overrides
from otr_cli.cli import main
from test_train_distributed import torchrun

pytestmark = pytest.mark.slow

# Dropout off: the ZeRO-0 and ZeRO-3 runs must train the same adapter, and dropout draws depend on the rank.
LORA = ["loss=sft", "model.lora.enabled=true", "model.lora.r=4", "model.lora.dropout=0.0", "trainer.max_steps=4",
        "trainer.save_steps=2"]
PARTITION_EVERYTHING = "+deepspeed.extra.zero_optimization.stage3_param_persistence_threshold=0"


def zero3_lora_args(model_dir: Path, out: Path) -> list[str]:
    """2 ranks of micro batch 2: the global batch of one process of micro batch 4."""
    return ["train", *tiny_overrides(model_dir, out, *LORA, "deepspeed=zero3", PARTITION_EVERYTHING,
                                     "trainer.micro_batch_size=2")]


@pytest.fixture(scope="module")
def zero3_lora_run(tiny_qwen3_model_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("zero3-lora") / "run"
    torchrun(zero3_lora_args(tiny_qwen3_model_dir, out))
    return out


def load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(path)


def test_two_rank_zero3_lora_run_saves_its_checkpoint(zero3_lora_run, tiny_qwen3_model_dir):
    from transformers import AutoModelForCausalLM

    for folder in (zero3_lora_run / "checkpoints" / "checkpoint-2", zero3_lora_run / "checkpoints" / "checkpoint-4",
                   zero3_lora_run / "final"):
        assert (folder / "adapter" / "adapter_config.json").is_file(), folder
        assert (folder / "adapter" / "adapter_model.safetensors").is_file(), folder
        merged = load_safetensors(folder / "model.safetensors")
        base = load_safetensors(Path(tiny_qwen3_model_dir) / "model.safetensors")
        # Before the fix every partitioned tensor was written with shape (0,).
        assert {k: v.shape for k, v in merged.items()} == {k: v.shape for k, v in base.items()}, folder
    assert not (zero3_lora_run / "final" / "zero_to_torch.py").exists()
    AutoModelForCausalLM.from_pretrained(zero3_lora_run / "final")


def test_merged_export_gives_the_logits_of_base_plus_adapter_loaded_with_peft(zero3_lora_run, tiny_qwen3_model_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    final = zero3_lora_run / "final"
    adapter = load_safetensors(final / "adapter" / "adapter_model.safetensors")
    assert any("lora_B" in k and v.abs().sum() > 0 for k, v in adapter.items()), "the adapter was not trained"
    assert json.loads((final / "adapter" / "adapter_config.json").read_text())["r"] == 4
    merged = AutoModelForCausalLM.from_pretrained(final).eval()
    with_adapter = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_qwen3_model_dir),
                                             final / "adapter").eval()
    input_ids = torch.randint(0, merged.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        merged_logits = merged(input_ids).logits
        adapter_logits = with_adapter(input_ids).logits
    # fp32: W x + s B (A x) against (W + s B A) x differ by reassociation, ~1e-7 relative per layer;
    # measured 2.7e-7 on logits of magnitude ~0.5. 1e-5 admits any CPU's kernels but not a wrong or
    # missing merge: the adapter moves the logits by more than 1e-4 (asserted below).
    torch.testing.assert_close(merged_logits, adapter_logits, rtol=0, atol=1e-5)
    assert (merged_logits - AutoModelForCausalLM.from_pretrained(tiny_qwen3_model_dir)(input_ids).logits
            ).abs().max() > 1e-4


def test_zero0_export_gives_the_same_merged_weights_as_zero3(zero3_lora_run, tiny_qwen3_model_dir, tmp_path):
    out = tmp_path / "zero0"
    main(["train", *tiny_overrides(tiny_qwen3_model_dir, out, *LORA, "trainer.micro_batch_size=4")])
    # Same weights loaded (ZeRO-3 partitions them as it loads, models.partitioned_loading), same global
    # batches: the same loss at every step, the first one included (this was test_zero3_init.py's own
    # 2-rank run, full fine-tuning for one step, whose loss depends only on the loaded weights too).
    losses0 = [r for r in read_jsonl(out / "metrics.jsonl") if "loss" in r]
    losses3 = [r for r in read_jsonl(zero3_lora_run / "metrics.jsonl") if "loss" in r]
    assert [r["step"] for r in losses3] == [r["step"] for r in losses0] == [1, 2, 3, 4]
    for left, right in zip(losses0, losses3):
        assert right["loss"] == pytest.approx(left["loss"], rel=1e-5), left["step"]
        assert right["supervised_tokens"] == left["supervised_tokens"]
    zero0 = load_safetensors(out / "final" / "model.safetensors")
    zero3 = load_safetensors(zero3_lora_run / "final" / "model.safetensors")
    assert zero0.keys() == zero3.keys()
    # Same global batch, deterministic SFT, same LoRA initialisation: the two differ only by the order of
    # float sums (2 ranks' reduce-scatter against one process), ~1e-7 relative; Adam's first steps move
    # each weight by ~lr = 1e-3, so a different adapter would show at that size.
    for key in zero0:
        torch.testing.assert_close(zero3[key], zero0[key], rtol=1e-4, atol=1e-6, msg=key)
    adapter0 = load_safetensors(out / "final" / "adapter" / "adapter_model.safetensors")
    adapter3 = load_safetensors(zero3_lora_run / "final" / "adapter" / "adapter_model.safetensors")
    assert adapter0.keys() == adapter3.keys()
    for key in adapter0:
        torch.testing.assert_close(adapter3[key], adapter0[key], rtol=1e-4, atol=1e-6, msg=key)


def test_two_rank_zero3_lora_run_resumes_with_the_losses_of_an_uninterrupted_run(zero3_lora_run,
                                                                                  tiny_qwen3_model_dir, tmp_path):
    cut = tmp_path / "cut"
    shutil.copytree(zero3_lora_run, cut)
    # Turn the copy back into a run killed after step 2.
    shutil.rmtree(cut / "final")
    shutil.rmtree(cut / "checkpoints" / "checkpoint-4")
    (cut / "run_state.json").write_text('{"status": "running"}')
    torchrun(zero3_lora_args(tiny_qwen3_model_dir, cut))
    full = [r for r in read_jsonl(zero3_lora_run / "metrics.jsonl") if "loss" in r]
    resumed = [r for r in read_jsonl(cut / "metrics.jsonl") if "loss" in r]
    assert [r["step"] for r in resumed] == [1, 2, 3, 4]
    for left, right in zip(full, resumed):
        assert right["loss"] == pytest.approx(left["loss"], rel=1e-5)
    torch.testing.assert_close(load_safetensors(cut / "final" / "adapter" / "adapter_model.safetensors"),
                               load_safetensors(zero3_lora_run / "final" / "adapter" / "adapter_model.safetensors"),
                               rtol=1e-5, atol=1e-7)
