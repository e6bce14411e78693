"""eval.backend=vllm: the child-process protocol, its settings and its errors, without vLLM.

The child is replaced by a stand-in script that speaks the same file protocol (it does not imitate
vLLM's generation: it echoes its request back), or the real child file runs with a fake `vllm`
module (FAKE_VLLM below), so what is tested is the parent's side: what it sends, how it maps results
back, how it reports failures, how it stops the child. The real vLLM (CPU build) runs in
scripts/vllm_check.sh (tests/test_vllm_real.py) and on a GPU in scripts/gpu_check.py. The
missing-vLLM error uses the real child.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from otr_cli.config import ConfigError, EvalConfig, ModelConfig, VllmConfig
from otr_cli.eval.generation import (GIB, GenerationSettings, VllmEngineSettings, check_vllm_placement,
                                     child_visible_devices, generate_vllm, ranks_per_node, vllm_memory_fraction)
from otr_cli.eval.runner import check_eval_config, vllm_engine


class CharTokenizer:
    """A stand-in tokenizer (the stand-in children never read the ids back): one id per character,
    and with add_special_tokens a BOS (id 1) in front, as a Llama 3 tokenizer adds."""

    def __call__(self, texts, add_special_tokens=True):
        return {"input_ids": [([1] if add_special_tokens else []) + [ord(c) for c in text] for text in texts]}

STAND_IN = """
import json, sys
from pathlib import Path
request = json.loads(Path(sys.argv[1]).read_text())
Path({record!r}).write_text(json.dumps(request))
n = request["sampling"]["n"]
texts = ["".join(map(chr, ids)) for ids in request["prompt_token_ids"]]
completions = [[f"{{text[::-1]}} #{{k}} STOP tail" for k in range(n)] for text in texts]
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
                                tokenizer=CharTokenizer(), engine=engine, command=command)
    request = json.loads(record.read_text())
    assert request["model"] == str(model_dir) and request["prompt_token_ids"] == [[97, 98, 99], [100, 101]]
    assert request["sampling"] == {"n": 2, "temperature": 0.5, "top_p": 0.9, "max_tokens": 7, "stop": ["STOP"], "seed": 3}
    assert request["engine"] == {"gpu_memory_utilization": 0.4, "tensor_parallel_size": 2, "max_model_len": 1024,
                                 "dtype": None, "seed": 3}
    assert completions == [["cba #0 ", "cba #1 "], ["ed #0 ", "ed #1 "]]  # in order, cut at the stop string
    assert seen == [([0, 1], completions)]


@pytest.mark.slow
def test_a_failing_child_is_reported_with_its_output(tmp_path):
    command, _ = stand_in(tmp_path, "import sys\nprint('CUDA out of memory in the child', file=sys.stderr)\nsys.exit(1)\n")
    with pytest.raises(RuntimeError, match="CUDA out of memory in the child"):
        generate_vllm(str(exported_dir(tmp_path)), ["x"], GenerationSettings(backend="vllm"), tokenizer=CharTokenizer(),
                      command=command)


@pytest.mark.slow
def test_missing_vllm_is_a_config_error_naming_the_backend_key(tmp_path):
    import importlib.util

    if importlib.util.find_spec("vllm") is not None:
        pytest.skip("vllm is installed here")
    with pytest.raises(ConfigError, match="eval.backend=vllm needs vLLM installed"):
        generate_vllm(str(exported_dir(tmp_path)), ["x"], GenerationSettings(backend="vllm"),
                      tokenizer=CharTokenizer())  # the real child


def test_child_sees_only_the_parents_gpu_unless_the_model_spans_several():
    assert child_visible_devices(None, None, 1) is None  # parent on no GPU: inherit
    assert child_visible_devices(None, 2, 1) == "2"
    assert child_visible_devices("4,5,6", 1, 1) == "5"  # rank with LOCAL_RANK 1 of a restricted node
    assert child_visible_devices("4,5,6", 1, 2) is None  # tensor parallel: vLLM places its workers


def test_eval_vllm_keys_reach_the_engine_settings_and_bad_values_name_their_key():
    cfg = EvalConfig(backend="vllm", vllm=VllmConfig(gpu_memory_utilization=0.3, tensor_parallel_size=4,
                                                     max_model_len=2048, dtype="float16"))
    check_eval_config(cfg)
    assert vllm_engine(cfg) == VllmEngineSettings(0.3, 4, 2048, "float16")
    for vllm, key in [(VllmConfig(gpu_memory_utilization=1.5), "eval.vllm.gpu_memory_utilization"),
                      (VllmConfig(tensor_parallel_size=0), "eval.vllm.tensor_parallel_size"),
                      (VllmConfig(max_model_len=16), "eval.vllm.max_model_len"),
                      (VllmConfig(dtype="fp8"), "eval.vllm.dtype")]:
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
Path(sys.argv[3]).write_text(json.dumps({{"completions": [["42"] * n for _ in request["prompt_token_ids"]]}}))
"""


def recording_child(tmp_path: Path) -> tuple[Path, Path]:
    """(a stand-in vLLM interpreter running RECORDING_CHILD, the file where it records each model it was given)."""
    record = tmp_path / "models.jsonl"
    child = tmp_path / "python-with-vllm"
    child.write_text(RECORDING_CHILD.format(python=sys.executable, record=str(record)))
    child.chmod(0o755)
    return child, record


@pytest.mark.slow
def test_training_with_vllm_evaluation_hands_the_child_an_exported_directory(tiny_model_dir, tmp_path):
    from helpers import tiny_overrides
    from otr_cli.cli import main

    child, record = recording_child(tmp_path)
    main(["train", *tiny_overrides(tiny_model_dir, tmp_path / "run", "trainer.max_steps=2", "trainer.save_steps=0",
                                   "eval.benchmarks=[synthetic_arith]", "eval.every_steps=1",
                                   "eval.every_steps_limit=2", "eval.limit=2", "eval.backend=vllm",
                                   f"eval.vllm.python={child}")])
    calls = [json.loads(line) for line in record.read_text().splitlines()]
    assert len(calls) >= 2  # step 1 (no checkpoint: a temporary export) and the final model
    assert all(call["has_config"] and "@step-" not in call["model"] for call in calls), calls


def test_vllm_dtype_defaults_to_the_dtype_the_hf_backend_would_load_the_model_in(monkeypatch):
    import torch

    from otr_cli.eval.runner import vllm_dtype

    assert vllm_dtype(EvalConfig(), ModelConfig(dtype="auto"), cuda=False) == "float32"
    assert vllm_dtype(EvalConfig(), ModelConfig(dtype="auto"), cuda=True) == "bfloat16"
    assert vllm_dtype(EvalConfig(), ModelConfig(dtype="float16"), cuda=True) == "float16"
    assert vllm_dtype(EvalConfig(vllm=VllmConfig(dtype="auto")), ModelConfig(dtype="float32"), cuda=False) == "auto"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert vllm_engine(EvalConfig(backend="vllm")).dtype == "float32"


def bos_tokenizer():
    """A fast tokenizer that adds a BOS when asked to, as Llama 3's does, with a chat template that writes one."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"<|begin_of_text|>": 0, "<|eot_id|>": 1, "[UNK]": 2, "user": 3, "assistant": 4, "what": 5, "is": 6,
             "2": 7, "+": 8, "3": 9, "?": 10}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.post_processor = processors.TemplateProcessing(single="<|begin_of_text|> $A",
                                                           special_tokens=[("<|begin_of_text|>", 0)])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<|begin_of_text|>",
                                        eos_token="<|eot_id|>", unk_token="[UNK]", pad_token="<|eot_id|>")
    tokenizer.chat_template = ("{{ bos_token }}{% for m in messages %}{{ m['role'] }} {{ m['content'] }} "
                               "<|eot_id|> {% endfor %}{% if add_generation_prompt %}assistant {% endif %}")
    return tokenizer


@pytest.mark.slow
def test_prompts_reach_vllm_as_the_hf_backends_token_ids_with_a_single_bos(tmp_path):
    tokenizer = bos_tokenizer()
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "what is 2 + 3 ?"}], tokenize=False,
                                           add_generation_prompt=True)
    assert tokenizer(prompt)["input_ids"][:2] == [0, 0]  # what vLLM's own tokenization of the text gives
    command, record = stand_in(tmp_path, STAND_IN.replace('"".join(map(chr, ids))', 'str(ids)'))
    generate_vllm(str(exported_dir(tmp_path)), [prompt], GenerationSettings(backend="vllm"), tokenizer=tokenizer,
                  command=command)
    sent = json.loads(record.read_text())["prompt_token_ids"]
    hf = tokenizer([prompt], add_special_tokens=False)["input_ids"]  # how generate_hf encodes it
    assert sent == hf and sent[0][0] == 0 and sent[0][1] != 0, sent


def test_memory_default_is_what_is_free_less_a_margin_as_a_fraction_of_the_whole_gpu():
    total = 80 * GIB
    fraction = vllm_memory_fraction(free=60 * GIB, total=total, weight_bytes=16 * GIB)
    assert fraction * total <= 60 * GIB - 4 * GIB  # the margin: 5% of 80 GiB
    assert fraction == pytest.approx(56 / 80, abs=1e-3)


def test_too_little_free_gpu_memory_is_a_config_error_naming_the_key():
    with pytest.raises(ConfigError, match=r"^eval\.vllm\.gpu_memory_utilization: only 10\.0 GiB .* is free"):
        vllm_memory_fraction(free=10 * GIB, total=80 * GIB, weight_bytes=16 * GIB)


def test_an_explicit_memory_fraction_is_honoured_but_refused_when_more_than_is_free():
    assert vllm_memory_fraction(free=60 * GIB, total=80 * GIB, requested=0.5) == 0.5
    with pytest.raises(ConfigError, match=r"eval\.vllm\.gpu_memory_utilization=0\.85 asks for 68\.0 GiB"):
        vllm_memory_fraction(free=61.5 * GIB, total=80 * GIB, requested=0.85)


@pytest.mark.slow
def test_the_child_gets_the_fraction_computed_from_the_free_memory_of_its_ranks_gpu(tmp_path, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    asked = []
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: asked.append(device) or (30 * GIB, 80 * GIB))
    command, record = stand_in(tmp_path)
    generate_vllm(str(exported_dir(tmp_path)), ["x"], GenerationSettings(backend="vllm"), tokenizer=CharTokenizer(),
                  command=command)
    assert asked == [1]
    assert json.loads(record.read_text())["engine"]["gpu_memory_utilization"] == pytest.approx(26 / 80, abs=1e-3)


def test_on_cpu_the_memory_fraction_is_left_to_vllm(tmp_path, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    command, record = stand_in(tmp_path)
    generate_vllm(str(exported_dir(tmp_path)), ["x"], GenerationSettings(backend="vllm"), tokenizer=CharTokenizer(),
                  command=command)
    assert json.loads(record.read_text())["engine"]["gpu_memory_utilization"] is None  # the child drops None


def test_tensor_parallelism_with_several_ranks_per_node_is_refused_with_the_way_out():
    check_vllm_placement(2, 1)  # one rank per node: vLLM places its workers on the node's GPUs
    check_vllm_placement(1, 8)  # one GPU each: the rank's own
    with pytest.raises(ConfigError, match=r"^eval\.vllm\.tensor_parallel_size=2 with 8 ranks per node.*"
                                          r"eval\.vllm\.tensor_parallel_size=1.*otr eval model=CHECKPOINT"):
        check_vllm_placement(2, 8)


def test_ranks_per_node_comes_from_torchrun_or_srun_or_the_world_size():
    assert ranks_per_node({}) == 1
    assert ranks_per_node({"LOCAL_WORLD_SIZE": "4", "WORLD_SIZE": "16"}) == 4
    assert ranks_per_node({"SLURM_STEP_TASKS_PER_NODE": "8(x2)", "WORLD_SIZE": "16"}) == 8
    assert ranks_per_node({"WORLD_SIZE": "16", "SLURM_NNODES": "2"}) == 8


def test_otr_train_refuses_tensor_parallel_vllm_with_several_ranks_per_node_at_start_up(monkeypatch, capsys):
    from otr_cli.cli import main

    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    with pytest.raises(SystemExit) as stopped:
        main(["train", "recipe=smollm2_demo", "eval.backend=vllm", "eval.vllm.tensor_parallel_size=2",
              "dry_run=true"])
    assert stopped.value.code != 0
    assert "eval.vllm.tensor_parallel_size=2 with 8 ranks per node" in " ".join(capsys.readouterr().err.split())


class FakeModel:
    def __init__(self, parameters: int):
        import torch

        self.weight = torch.nn.Parameter(torch.zeros(parameters))

    def parameters(self):
        return [self.weight]


def train_cfg(*overrides: str):
    from omegaconf import OmegaConf

    from otr_cli.config import TrainConfig

    cfg = OmegaConf.merge(OmegaConf.structured(TrainConfig), OmegaConf.from_dotlist(list(overrides)))
    return OmegaConf.to_object(cfg)


def test_training_refuses_at_its_start_when_vllm_would_not_fit_beside_the_trainer():
    import torch

    from otr_cli.train.loop import check_vllm_fits_beside_trainer

    cfg = train_cfg("eval.benchmarks=[gsm8k]", "eval.backend=vllm", "eval.every_steps=100")
    model = FakeModel(1000)
    # ZeRO-3 state of an 8B model resident: 80 GB GPU with 61.5 GiB free, and the old default 0.85 asks 68 GiB.
    cfg.eval.vllm.gpu_memory_utilization = 0.85
    with pytest.raises(ConfigError, match=r"eval\.vllm\.gpu_memory_utilization=0\.85 asks for"):
        check_vllm_fits_beside_trainer(cfg, model, torch.device("cpu"), memory=lambda: (int(61.5 * GIB), 80 * GIB))
    cfg.eval.vllm.gpu_memory_utilization = None  # the default: what is free
    check_vllm_fits_beside_trainer(cfg, model, torch.device("cpu"), memory=lambda: (int(61.5 * GIB), 80 * GIB))
    with pytest.raises(ConfigError, match=r"^eval\.vllm\.gpu_memory_utilization: only 2\.0 GiB"):
        check_vllm_fits_beside_trainer(cfg, model, torch.device("cpu"), memory=lambda: (2 * GIB, 80 * GIB))
    # No periodic or phase-end evaluation: the trainer is gone before vLLM starts, nothing to check.
    quiet = train_cfg("eval.benchmarks=[gsm8k]", "eval.backend=vllm")
    check_vllm_fits_beside_trainer(quiet, model, torch.device("cpu"), memory=lambda: (2 * GIB, 80 * GIB))


def test_every_rank_raises_when_one_ranks_gpu_lacks_memory_for_vllm(monkeypatch):
    import torch

    from otr_cli.train import loop

    cfg = train_cfg("eval.benchmarks=[gsm8k]", "eval.backend=vllm", "eval.every_steps=100")
    # This rank has room; another rank (simulated by the all-reduce) has not.
    monkeypatch.setattr(loop, "all_reduce_sum", lambda values, device: [values[0] + 1.0])
    with pytest.raises(ConfigError, match=r"1 other rank\(s\) have too little GPU memory free for vLLM"):
        loop.check_vllm_fits_beside_trainer(cfg, FakeModel(10), torch.device("cpu"),
                                            memory=lambda: (60 * GIB, 80 * GIB))


# A fake `vllm` for the real child file (otr_cli/eval/vllm_child.py): it starts a process of its own, as
# vLLM starts its engine core, records both process ids, and either sleeps (FAKE_VLLM_SLEEP seconds, as
# the engine's start-up does) or answers.
FAKE_VLLM = '''
import os, subprocess, sys, time
from types import SimpleNamespace

class SamplingParams:
    def __init__(self, **kwargs):
        self.n = kwargs["n"]

class LLM:
    def __init__(self, model, **engine):
        engine_core = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
        with open(os.environ["FAKE_VLLM_PIDS"], "a") as handle:
            handle.write(f"{os.getpid()} {engine_core.pid}\\n")
        time.sleep(float(os.environ.get("FAKE_VLLM_SLEEP", "0")))

    def generate(self, prompts, params, use_tqdm=False):
        return [SimpleNamespace(outputs=[SimpleNamespace(text="42", token_ids=[1]) for _ in range(params.n)])
                for _ in prompts]
'''


def fake_vllm_python(tmp_path) -> tuple[str, Path]:
    """An interpreter path for eval.vllm.python: this Python with the fake vllm importable; and the pid file."""
    package = tmp_path / "fake_vllm" / "vllm"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text(FAKE_VLLM)
    python = tmp_path / "python-with-fake-vllm"
    python.write_text(f"#!/bin/sh\nPYTHONPATH={package.parent} exec {sys.executable} \"$@\"\n")
    python.chmod(0o755)
    return str(python), tmp_path / "vllm_pids.txt"


def alive(pid: int) -> bool:
    import os

    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie (exited, not yet reaped) holds nothing
        return open(f"/proc/{pid}/stat").read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def wait_for_pids(pids_file, process, log, timeout=240.0) -> list[int]:
    """The fake vLLM's process ids: the child's and its engine core's."""
    import time

    deadline = time.time() + timeout
    while not (pids_file.is_file() and pids_file.read_text().endswith("\n")):
        assert process.poll() is None and time.time() < deadline, log.read_text()[-3000:]
        time.sleep(0.1)
    return [int(pid) for pid in pids_file.read_text().split()]


@pytest.mark.slow
@pytest.mark.faults
def test_a_stop_signal_to_the_whole_process_group_during_vllm_generation_saves_and_leaves_no_child(
        tiny_model_dir, tmp_path):
    import os
    import signal
    import subprocess
    import time

    from helpers import REPO, subprocess_env, tiny_overrides
    from otr_cli.train import preemption

    python, pids = fake_vllm_python(tmp_path)
    out = tmp_path / "run"
    log = tmp_path / "train.log"
    env = subprocess_env() | {"FAKE_VLLM_PIDS": str(pids), "FAKE_VLLM_SLEEP": "600"}
    args = tiny_overrides(tiny_model_dir, out, "trainer.max_steps=4", "trainer.save_steps=0",
                          "eval.benchmarks=[synthetic_arith]", "eval.every_steps=2", "eval.limit=2",
                          "eval.backend=vllm", f"eval.vllm.python={python}")
    with log.open("w") as handle:  # a group of its own, as SLURM's job step: the signal goes to all of it
        process = subprocess.Popen([sys.executable, "-m", "otr_cli.cli", "train", *args], cwd=REPO, env=env,
                                   stdout=handle, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        children = wait_for_pids(pids, process, log)
        time.sleep(0.5)
        os.killpg(process.pid, signal.SIGUSR1)
        code = process.wait(timeout=120)
    finally:
        process.kill()
    text = " ".join(log.read_text().split())
    assert code == preemption.PREEMPTED_EXIT, text[-3000:]
    assert "SIGUSR1 received" in text
    assert json.loads((out / "run_state.json").read_text())["status"] == "preempted"
    assert (out / "checkpoints" / "checkpoint-2" / "trainer_state.json").is_file()
    assert not any(alive(pid) for pid in children), "the vLLM child or its engine outlived the stop"


@pytest.mark.slow
def test_the_vllm_child_and_its_engine_die_when_their_parent_is_killed(tmp_path):
    import os
    import signal
    import subprocess
    import time

    from helpers import subprocess_env

    python, pids = fake_vllm_python(tmp_path)
    model = exported_dir(tmp_path)
    parent_script = tmp_path / "parent.py"
    parent_script.write_text(f"""
import sys
from pathlib import Path
sys.path.insert(0, {str(__import__("helpers").REPO)!r})
from otr_cli.eval.generation import GenerationSettings, generate_vllm, vllm_child_command
class Tok:
    def __call__(self, texts, add_special_tokens=True):
        return {{"input_ids": [[1, 2] for _ in texts]}}
generate_vllm({str(model)!r}, ["x"], GenerationSettings(backend="vllm"), tokenizer=Tok(),
              command=vllm_child_command({python!r}))
""")
    log = tmp_path / "parent.log"
    env = subprocess_env() | {"FAKE_VLLM_PIDS": str(pids), "FAKE_VLLM_SLEEP": "600"}
    with log.open("w") as handle:
        parent = subprocess.Popen([sys.executable, str(parent_script)], env=env, stdout=handle,
                                  stderr=subprocess.STDOUT)
    try:
        children = wait_for_pids(pids, parent, log, timeout=60)
        assert all(alive(pid) for pid in children)
        os.kill(parent.pid, signal.SIGKILL)  # no chance to end its child
        parent.wait()
        deadline = time.time() + 10
        while any(alive(pid) for pid in children) and time.time() < deadline:
            time.sleep(0.05)
        assert not any(alive(pid) for pid in children), "the vLLM child or its engine outlived its killed parent"
    finally:
        parent.kill()
        for pid in children if "children" in locals() else []:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


@pytest.mark.slow
def test_one_vllm_engine_serves_every_benchmark_of_an_evaluation(tiny_model_dir, tmp_path):
    from otr_cli.config import DataConfig
    from otr_cli.eval.runner import evaluate_model

    child, record = recording_child(tmp_path)
    cfg = EvalConfig(benchmarks=["synthetic_arith", "synthetic_arith_ood"], limit=3, backend="vllm", batch_size=2,
                     vllm=VllmConfig(python=str(child)))
    results = evaluate_model(str(tiny_model_dir), cfg, DataConfig(), tmp_path / "eval")
    assert len(record.read_text().splitlines()) == 1  # one child, hence one engine start-up, for both
    assert results["synthetic_arith"]["n"] == 3 and results["synthetic_arith_ood"]["n"] == 3
