"""`otr export CHECKPOINT --out DIR`: a Hugging Face model from a checkpoint holding DeepSpeed's state only.

The runs are 2 gloo ranks under ZeRO-3 with every parameter partitioned (the tiny model's projections
are under the persistence threshold otherwise) and trainer.export_every_save=false, so the last
checkpoint holds each rank's shard and no model; the export runs in a plain process (no torchrun, no
RANK or WORLD_SIZE). Its tensors must equal those of the run's own final/, which the training process
gathered from the live engine.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from helpers import run_cli, tiny_overrides
from otr_cli.cli import main
from otr_cli.data.chat import BUILTIN_TEMPLATES
from test_rehearsal import run_ranks

ZERO3_LEAN = ["loss=sft", "deepspeed=zero3", "trainer.micro_batch_size=2", "trainer.max_steps=3",
              "trainer.save_steps=2", "trainer.export_every_save=false",
              "+deepspeed.extra.zero_optimization.stage3_param_persistence_threshold=0"]
LORA = ["model.lora.enabled=true", "model.lora.r=4", "model.lora.dropout=0.0"]


def load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(path)


def assert_same_tensors(exported: Path, final: Path, dtype: torch.dtype = torch.float32) -> None:
    mine, theirs = load_safetensors(exported), load_safetensors(final)
    assert mine.keys() == theirs.keys()
    for key in mine:
        assert mine[key].dtype == dtype, key
        # Exactly: the export merges the fp32 master weights, the run gathered the fp32 module weights
        # they were copied into; a dtype other than the training one is the same cast of the same values.
        torch.testing.assert_close(mine[key], theirs[key].to(dtype), rtol=0, atol=0, msg=key)


def last_checkpoint(run: Path) -> Path:
    checkpoints = [p for p in (run / "checkpoints").iterdir() if (p / "trainer_state.json").is_file()]
    return max(checkpoints, key=lambda p: json.loads((p / "trainer_state.json").read_text())["global_step"])


@pytest.fixture(scope="module")
def zero3_run(tiny_qwen3_model_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("zero3-lean") / "run"
    # data.chat_template=chatml over the tokenizer's own template: the export must carry the one trained with.
    run_ranks(["train", *tiny_overrides(tiny_qwen3_model_dir, out, *ZERO3_LEAN, "data.chat_template=chatml")],
              out.parent / "logs")
    return out


@pytest.fixture(scope="module")
def zero3_lora_run(tiny_qwen3_model_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("zero3-lora-lean") / "run"
    run_ranks(["train", *tiny_overrides(tiny_qwen3_model_dir, out, *ZERO3_LEAN, *LORA)], out.parent / "logs")
    return out


@pytest.mark.slow
def test_export_of_a_zero3_checkpoint_without_a_model_equals_the_runs_final_model(zero3_run, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    checkpoint = last_checkpoint(zero3_run)
    assert not (checkpoint / "model.safetensors").exists()
    assert len(list((checkpoint / "ds").glob("*optim_states.pt"))) == 2
    out = tmp_path / "exported"
    result = run_cli(["export", str(checkpoint), "--out", str(out)])
    assert f"to {out}" in result.stdout
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.dtype == torch.float32
    assert_same_tensors(out / "model.safetensors", zero3_run / "final" / "model.safetensors")
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert tokenizer.chat_template == BUILTIN_TEMPLATES["chatml"]
    generation = json.loads((out / "generation_config.json").read_text())
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert im_end in (generation["eos_token_id"] if isinstance(generation["eos_token_id"], list)
                      else [generation["eos_token_id"]])
    # The run's own final/ carries the same template.
    assert AutoTokenizer.from_pretrained(zero3_run / "final").chat_template == BUILTIN_TEMPLATES["chatml"]


@pytest.mark.slow
def test_the_runs_own_exports_keep_the_generation_cache_on(zero3_run):
    """Training switches the KV cache off; final/ (an export of its own with export_every_save=false) must not
    keep that, or every `generate` of its users recomputes the whole prefix."""
    assert json.loads((zero3_run / "final" / "config.json").read_text())["use_cache"] is True


@pytest.mark.slow
def test_export_with_dtype_bfloat16_writes_the_final_model_cast_to_bfloat16(zero3_run, tmp_path):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "bf16"
    assert main(["export", str(last_checkpoint(zero3_run)), "--out", str(out), "--dtype", "bfloat16"]) == 0
    assert AutoModelForCausalLM.from_pretrained(out).dtype == torch.bfloat16
    assert_same_tensors(out / "model.safetensors", zero3_run / "final" / "model.safetensors", torch.bfloat16)


@pytest.mark.slow
def test_export_of_a_zero3_lora_checkpoint_merged_equals_the_runs_final_model(zero3_lora_run, tmp_path):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "merged"
    run_cli(["export", str(last_checkpoint(zero3_lora_run)), "--out", str(out)])
    AutoModelForCausalLM.from_pretrained(out)
    assert_same_tensors(out / "model.safetensors", zero3_lora_run / "final" / "model.safetensors")
    assert_same_tensors(out / "adapter" / "adapter_model.safetensors",
                        zero3_lora_run / "final" / "adapter" / "adapter_model.safetensors")


@pytest.mark.slow
def test_export_of_a_zero3_lora_checkpoint_with_adapter_writes_the_adapter_alone(zero3_lora_run,
                                                                                tiny_qwen3_model_dir, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out = tmp_path / "adapter"
    assert main(["export", str(last_checkpoint(zero3_lora_run)), "--out", str(out), "--adapter"]) == 0
    assert not (out / "model.safetensors").exists()
    assert json.loads((out / "adapter_config.json").read_text())["r"] == 4
    assert_same_tensors(out / "adapter_model.safetensors",
                        zero3_lora_run / "final" / "adapter" / "adapter_model.safetensors")
    with_adapter = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_qwen3_model_dir), out).eval()
    merged = AutoModelForCausalLM.from_pretrained(zero3_lora_run / "final").eval()
    input_ids = torch.randint(0, merged.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        # W x + s B (A x) against (W + s B A) x: reassociation only (test_lora_export.py measured 2.7e-7).
        torch.testing.assert_close(with_adapter(input_ids).logits, merged(input_ids).logits, rtol=0, atol=1e-5)


@pytest.mark.slow
def test_export_with_adapter_of_a_run_without_lora_is_a_one_line_error(zero3_run, tmp_path, capsys):
    with pytest.raises(SystemExit) as stop:
        main(["export", str(last_checkpoint(zero3_run)), "--out", str(tmp_path / "x"), "--adapter"])
    assert stop.value.code == 2
    err = capsys.readouterr().err.strip()
    assert "--adapter" in err and "not of a LoRA run" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "x").exists()


def export_error(args: list[str], capsys) -> str:
    with pytest.raises(SystemExit) as stop:
        main(["export", *args])
    assert stop.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


def test_export_of_a_path_that_does_not_exist_is_a_one_line_error(tmp_path, capsys):
    err = export_error([str(tmp_path / "nope"), "--out", str(tmp_path / "out")], capsys)
    assert str(tmp_path / "nope") in err and "no such checkpoint directory" in err


def test_export_of_a_directory_without_deepspeed_state_is_a_one_line_error(tmp_path, capsys):
    (tmp_path / "step-2").mkdir()
    err = export_error([str(tmp_path / "step-2"), "--out", str(tmp_path / "out")], capsys)
    assert "holds no DeepSpeed state" in err and "ds/" in err


def test_export_of_a_hugging_face_model_says_it_is_one_already(tiny_model_dir, tmp_path, capsys):
    err = export_error([str(tiny_model_dir), "--out", str(tmp_path / "out")], capsys)
    assert "already a Hugging Face model" in err


def test_export_of_a_checkpoint_without_its_run_config_says_what_is_needed(tmp_path, capsys):
    checkpoint = tmp_path / "somewhere" / "step-2"
    (checkpoint / "ds").mkdir(parents=True)
    err = export_error([str(checkpoint), "--out", str(tmp_path / "out")], capsys)
    assert "config.yaml" in err and "--config" in err


def test_export_into_a_directory_that_is_not_empty_is_refused(tmp_path, capsys):
    (tmp_path / "step-2" / "ds").mkdir(parents=True)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "model.safetensors").write_text("mine")
    err = export_error([str(tmp_path / "step-2"), "--out", str(tmp_path / "out")], capsys)
    assert "not an empty directory" in err
    assert (tmp_path / "out" / "model.safetensors").read_text() == "mine"


def test_export_help_names_the_options(capsys):
    with pytest.raises(SystemExit) as stop:
        main(["export", "--help"])
    assert stop.value.code == 0
    text = capsys.readouterr().out
    for option in ("--out", "--dtype", "--adapter", "--config", "bfloat16"):
        assert option in text


@pytest.fixture(scope="module")
def zero0_run(tiny_model_dir, tmp_path_factory) -> Path:
    """One process, ZeRO-0, the tied-embedding model; every checkpoint holds its own export."""
    out = tmp_path_factory.mktemp("zero0") / "run"
    main(["train", *tiny_overrides(tiny_model_dir, out, "loss=sft", "deepspeed=zero0", "trainer.save_steps=2")])
    return out


@pytest.mark.slow
def test_export_of_a_zero0_checkpoint_equals_its_own_export(zero0_run, tmp_path):
    checkpoint = last_checkpoint(zero0_run)
    out = tmp_path / "exported"
    assert main(["export", str(checkpoint), "--out", str(out)]) == 0
    assert_same_tensors(out / "model.safetensors", checkpoint / "model.safetensors")


@pytest.mark.slow
def test_export_of_a_checkpoint_moved_away_from_its_run_reads_the_architecture_from_its_config_json(zero0_run,
                                                                                                   tmp_path):
    import shutil

    from transformers import AutoTokenizer

    checkpoint = last_checkpoint(zero0_run)
    moved = tmp_path / "elsewhere" / checkpoint.name  # no config.yaml above it
    shutil.copytree(checkpoint, moved)
    out = tmp_path / "exported"
    assert main(["export", str(moved), "--out", str(out)]) == 0
    assert_same_tensors(out / "model.safetensors", moved / "model.safetensors")
    assert AutoTokenizer.from_pretrained(out).chat_template == AutoTokenizer.from_pretrained(moved).chat_template
