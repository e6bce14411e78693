"""eval.backend=vllm: the child-process protocol, its settings and its errors, without vLLM.

vLLM cannot be installed here (no GPU). The child is replaced by a stand-in script that speaks the
same file protocol (it does not imitate vLLM's generation: it echoes its request back), so what is
tested is the parent's side: what it sends, how it maps results back, how it reports failures. The
real child runs in scripts/gpu_check.py on a GPU. The missing-vLLM error uses the real child.
"""

from __future__ import annotations

import json
import sys

import pytest

from otr_cli.config import ConfigError, EvalConfig, VllmConfig
from otr_cli.eval.generation import GenerationSettings, VllmEngineSettings, child_visible_devices, generate_vllm
from otr_cli.eval.runner import check_eval_config, vllm_engine

STAND_IN = """
import json, sys
from pathlib import Path
request = json.loads(Path(sys.argv[1]).read_text())
Path({record!r}).write_text(json.dumps(request))
n = request["sampling"]["n"]
completions = [[f"{{prompt[::-1]}} #{{k}} STOP tail" for k in range(n)] for prompt in request["prompts"]]
Path(sys.argv[2]).write_text(json.dumps({{"completions": completions, "seconds": 0.0, "generated_tokens": 0}}))
"""


def exported_dir(tmp_path):
    """A directory that looks like an export to resolve_source (its config.json); the stand-in never reads it."""
    directory = tmp_path / "export"
    directory.mkdir(exist_ok=True)
    (directory / "config.json").write_text("{}")
    return directory


def stand_in(tmp_path, body=STAND_IN):
    script = tmp_path / "stand_in.py"
    record = tmp_path / "request.json"
    script.write_text(body.format(record=str(record)))
    return [sys.executable, str(script)], record


@pytest.mark.slow
def test_child_gets_the_exported_model_prompts_sampling_and_engine_settings(tmp_path):
    model_dir = exported_dir(tmp_path)
    command, record = stand_in(tmp_path)
    settings = GenerationSettings(max_new_tokens=7, num_samples=2, temperature=0.5, top_p=0.9, stop=("STOP",), seed=3,
                                  backend="vllm")
    engine = VllmEngineSettings(gpu_memory_utilization=0.4, tensor_parallel_size=2, max_model_len=1024)
    seen = []
    completions = generate_vllm(str(model_dir), ["abc", "de"], settings, lambda idx, batch: seen.append((idx, batch)),
                                engine=engine, command=command)
    request = json.loads(record.read_text())
    assert request["model"] == str(model_dir) and request["prompts"] == ["abc", "de"]
    assert request["sampling"] == {"n": 2, "temperature": 0.5, "top_p": 0.9, "max_tokens": 7, "stop": ["STOP"], "seed": 3}
    assert request["engine"] == {"gpu_memory_utilization": 0.4, "tensor_parallel_size": 2, "max_model_len": 1024,
                                 "seed": 3}
    assert completions == [["cba #0 ", "cba #1 "], ["ed #0 ", "ed #1 "]]  # in order, cut at the stop string
    assert seen == [([0, 1], completions)]


@pytest.mark.slow
def test_a_failing_child_is_reported_with_its_output(tmp_path):
    command, _ = stand_in(tmp_path, "import sys\nprint('CUDA out of memory in the child', file=sys.stderr)\nsys.exit(1)\n")
    with pytest.raises(RuntimeError, match="CUDA out of memory in the child"):
        generate_vllm(str(exported_dir(tmp_path)), ["x"], GenerationSettings(backend="vllm"), command=command)


@pytest.mark.slow
def test_missing_vllm_is_a_config_error_naming_the_backend_key(tmp_path):
    import importlib.util

    if importlib.util.find_spec("vllm") is not None:
        pytest.skip("vllm is installed here")
    with pytest.raises(ConfigError, match="eval.backend=vllm needs vLLM installed"):
        generate_vllm(str(exported_dir(tmp_path)), ["x"], GenerationSettings(backend="vllm"))  # the real child


def test_child_sees_only_the_parents_gpu_unless_the_model_spans_several():
    assert child_visible_devices(None, None, 1) is None  # parent on no GPU: inherit
    assert child_visible_devices(None, 2, 1) == "2"
    assert child_visible_devices("4,5,6", 1, 1) == "5"  # rank with LOCAL_RANK 1 of a restricted node
    assert child_visible_devices("4,5,6", 1, 2) is None  # tensor parallel: vLLM places its workers


def test_eval_vllm_keys_reach_the_engine_settings_and_bad_values_name_their_key():
    cfg = EvalConfig(backend="vllm", vllm=VllmConfig(gpu_memory_utilization=0.3, tensor_parallel_size=4,
                                                     max_model_len=2048))
    check_eval_config(cfg)
    assert vllm_engine(cfg) == VllmEngineSettings(0.3, 4, 2048)
    for vllm, key in [(VllmConfig(gpu_memory_utilization=1.5), "eval.vllm.gpu_memory_utilization"),
                      (VllmConfig(tensor_parallel_size=0), "eval.vllm.tensor_parallel_size"),
                      (VllmConfig(max_model_len=16), "eval.vllm.max_model_len")]:
        with pytest.raises(ConfigError, match=key):
            check_eval_config(EvalConfig(backend="vllm", vllm=vllm))


RECORDING_CHILD = """#!{python}
# A stand-in for the vLLM child's interpreter: argv = [child file, request, result]. It records the
# model it was given and whether that was a model directory at the time, and answers every prompt.
import json, os, sys
from pathlib import Path
request = json.loads(Path(sys.argv[2]).read_text())
with open({record!r}, "a") as handle:
    handle.write(json.dumps({{"model": request["model"],
                             "has_config": os.path.isfile(os.path.join(request["model"], "config.json"))}}) + "\\n")
n = request["sampling"]["n"]
Path(sys.argv[3]).write_text(json.dumps({{"completions": [["42"] * n for _ in request["prompts"]]}}))
"""


@pytest.mark.slow
def test_training_with_vllm_evaluation_hands_the_child_an_exported_directory(tiny_model_dir, tmp_path):
    from helpers import tiny_overrides
    from otr_cli.cli import main

    record = tmp_path / "models.jsonl"
    child = tmp_path / "python-with-vllm"
    child.write_text(RECORDING_CHILD.format(python=sys.executable, record=str(record)))
    child.chmod(0o755)
    main(["train", *tiny_overrides(tiny_model_dir, tmp_path / "run", "trainer.max_steps=2", "trainer.save_steps=0",
                                   "eval.benchmarks=[synthetic_arith]", "eval.every_steps=1",
                                   "eval.every_steps_limit=2", "eval.limit=2", "eval.backend=vllm",
                                   f"eval.vllm.python={child}")])
    calls = [json.loads(line) for line in record.read_text().splitlines()]
    assert len(calls) >= 2  # step 1 (no checkpoint: a temporary export) and the final model
    assert all(call["has_config"] and "@step-" not in call["model"] for call in calls), calls
