"""Batched generation with a KV cache, left padding and length-sorted batches (transformers or vLLM)."""

from __future__ import annotations

import logging
import sys
from dataclasses import asdict, dataclass, field
from typing import Callable, Optional

import torch

from otr_cli.config import ConfigError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GenerationSettings:
    """Everything besides the model and prompt that changes a completion (and so keys the cache)."""

    max_new_tokens: int = 256
    num_samples: int = 1
    temperature: float = 0.0
    top_p: float = 1.0
    stop: tuple[str, ...] = field(default_factory=tuple)
    seed: int = 0
    backend: str = "hf"

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def as_key(self) -> dict:
        return asdict(self) | {"stop": list(self.stop)}


def cut_at_stop(text: str, stop: tuple[str, ...]) -> str:
    """`text` up to (excluding) the first stop string."""
    cut = min((text.find(s) for s in stop if s and s in text), default=-1)
    return text[:cut] if cut >= 0 else text


# Called after each batch with the prompt indices done and their completions (num_samples each).
OnBatch = Callable[[list[int], list[list[str]]], None]


def length_sorted_batches(lengths: list[int], batch_size: int) -> list[list[int]]:
    """Prompt indices sorted by token length (stable) and cut into batches of `batch_size`.

    The one batch plan of an evaluation: a run sharded over ranks deals these batches out and a
    resumed run generates the batches it lacks, so both produce exactly the batches (hence the
    padding and the completions) of one uninterrupted process.
    """
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    return [order[start:start + batch_size] for start in range(0, len(order), batch_size)]


def prompt_lengths(tokenizer, prompts: list[str]) -> list[int]:
    """Token count of each rendered prompt (no special tokens added: the template has them)."""
    return [len(ids) for ids in tokenizer(prompts, add_special_tokens=False)["input_ids"]] if prompts else []


@torch.no_grad()
def generate_hf(model, tokenizer, prompts: list[str], settings: GenerationSettings, *, batch_size: int,
                on_batch: Optional[OnBatch] = None, batches: Optional[list[list[int]]] = None) -> list[list[str]]:
    """Completions for chat-rendered `prompts`: a list (per prompt) of `num_samples` strings, input order.

    Prompts are sorted by token length so a batch pads little; padding is on the left so every
    row's next token sits at the same position. `batches` (lists of prompt indices) replaces the
    length-sorted plan of all prompts: prompts in no batch get no completion (an empty list).
    Sampling draws from a generator seeded per batch from (settings.seed, first prompt index),
    so a resumed or sharded run samples the same way.
    """
    previous_side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    device = next(model.parameters()).device
    if batches is None:
        batches = length_sorted_batches(prompt_lengths(tokenizer, prompts), batch_size)
    completions: list[list[str]] = [[] for _ in prompts]
    sample_kwargs = ({"do_sample": False} if settings.greedy else
                     {"do_sample": True, "temperature": settings.temperature, "top_p": settings.top_p})
    try:
        for indices in batches:
            encoded = tokenizer([prompts[i] for i in indices], return_tensors="pt", padding=True,
                                add_special_tokens=False).to(device)
            if not settings.greedy:
                torch.manual_seed(settings.seed * 1_000_003 + indices[0])
            extra = {"stop_strings": list(settings.stop), "tokenizer": tokenizer} if settings.stop else {}
            output = model.generate(**encoded, max_new_tokens=settings.max_new_tokens,
                                    num_return_sequences=settings.num_samples, pad_token_id=tokenizer.pad_token_id,
                                    eos_token_id=tokenizer.eos_token_id, **sample_kwargs, **extra)
            texts = tokenizer.batch_decode(output[:, encoded["input_ids"].shape[1]:], skip_special_tokens=True)
            batch = [[cut_at_stop(t, settings.stop) for t in texts[k * settings.num_samples:(k + 1) * settings.num_samples]]
                     for k in range(len(indices))]
            for index, samples in zip(indices, batch):
                completions[index] = samples
            if on_batch:
                on_batch(indices, batch)
    finally:
        tokenizer.padding_side = previous_side
    return completions


@dataclass(frozen=True)
class VllmEngineSettings:
    """vLLM's engine settings (eval.vllm.*): fraction of each GPU's total memory it may claim (None:
    computed from what is free when the child starts, vllm_memory_fraction; on CPU left out), GPUs per
    model (tensor parallelism), the longest prompt + completion in tokens (None: the model's) and the
    weights' dtype (None: vLLM's choice; the runner passes the HF backend's)."""

    gpu_memory_utilization: Optional[float] = None
    tensor_parallel_size: int = 1
    max_model_len: Optional[int] = None
    dtype: Optional[str] = None


GIB = 1024 ** 3
# What vLLM is never handed of the free memory: the CUDA context of its own process, the allocator's
# fragmentation, what the trainer's next step may need back. The larger of the two.
VLLM_MARGIN_BYTES = GIB
VLLM_MARGIN_FRACTION = 0.05
# Beyond the weights, the least that makes an engine worth starting: activations and a small KV cache.
VLLM_MIN_EXTRA_BYTES = GIB


def vllm_margin(total: int) -> int:
    return max(VLLM_MARGIN_BYTES, int(VLLM_MARGIN_FRACTION * total))


def vllm_memory_fraction(free: int, total: int, weight_bytes: int = 0, requested: Optional[float] = None,
                         device: str = "the GPU") -> float:
    """gpu_memory_utilization for a vLLM engine started now on a GPU with `free` of `total` bytes free.

    vLLM reads the value as the fraction of the GPU's TOTAL memory that the engine may use, and refuses
    to start when that is more than is free. `requested` (eval.vllm.gpu_memory_utilization) is checked
    against what is free; None is computed: all that is free less a margin. Raises ConfigError naming
    the key when too little is free for the weights (`weight_bytes`, per GPU) and a minimal KV cache.
    """
    usable = free - vllm_margin(total)
    need = weight_bytes + VLLM_MIN_EXTRA_BYTES
    if requested is not None:
        if requested * total > free:
            raise ConfigError(
                f"eval.vllm.gpu_memory_utilization={requested} asks for {requested * total / GIB:.1f} GiB of "
                f"{device} but only {free / GIB:.1f} GiB of its {total / GIB:.1f} GiB is free (the trainer holds "
                f"the rest); lower it, or leave it null to use what is free")
        return requested
    if usable < need:
        raise ConfigError(
            f"eval.vllm.gpu_memory_utilization: only {free / GIB:.1f} GiB of {device}'s {total / GIB:.1f} GiB "
            f"is free, and vLLM needs about {need / GIB:.1f} GiB (weights + a minimal KV cache) beyond a margin of "
            f"{vllm_margin(total) / GIB:.1f} GiB; use eval.backend=hf, a ZeRO-3 offload config, or more GPUs")
    return int(usable / total * 1000) / 1000  # rounded down: never more than was free


def gpu_free_memory(device: Optional[int] = None) -> Optional[tuple[int, int]]:
    """(free, total) bytes of this process's GPU after the allocator's cache is returned; None without CUDA."""
    if not torch.cuda.is_available():
        return None
    torch.cuda.empty_cache()
    free, total = torch.cuda.mem_get_info(device)
    return int(free), int(total)


def model_weight_bytes(model_dir: str) -> int:
    """Bytes of the safetensors weights in `model_dir` (0 when it is not a local directory)."""
    from pathlib import Path

    directory = Path(model_dir)
    return sum(f.stat().st_size for f in directory.glob("*.safetensors")) if directory.is_dir() else 0


def child_visible_devices(parent_visible: Optional[str], current_device: Optional[int],
                          tensor_parallel_size: int) -> Optional[str]:
    """CUDA_VISIBLE_DEVICES for the vLLM child: the parent's current GPU alone when the parent uses
    one (a rank of `otr train` or a sharded `otr eval`) and the model fits on one GPU; otherwise
    unchanged (None: inherit). parent_visible: the parent's CUDA_VISIBLE_DEVICES (None: all GPUs).
    Several ranks per node with tensor_parallel_size > 1 are refused at start-up (check_vllm_placement).
    """
    if current_device is None or tensor_parallel_size != 1:
        return None
    visible = parent_visible.split(",") if parent_visible else None
    return visible[current_device] if visible else str(current_device)


def check_vllm_placement(tensor_parallel_size: int, ranks_per_node: int) -> None:
    """Refuse tensor parallelism when several ranks share a node: every rank's child would see all the
    node's GPUs and vLLM would place each on GPUs 0..TP-1, so all the children would land on the same GPUs
    (each beside a trainer rank's state). Raised before anything heavy starts."""
    if tensor_parallel_size > 1 and ranks_per_node > 1:
        raise ConfigError(
            f"eval.vllm.tensor_parallel_size={tensor_parallel_size} with {ranks_per_node} ranks per node: every "
            f"rank starts its own vLLM, and theirs would share GPUs 0..{tensor_parallel_size - 1}. Use "
            f"eval.vllm.tensor_parallel_size=1 (each rank's vLLM on its own GPU), or evaluate the saved "
            f"checkpoints afterwards in one process: otr eval model=CHECKPOINT eval.backend=vllm "
            f"eval.vllm.tensor_parallel_size={tensor_parallel_size}")


def ranks_per_node(env=None) -> int:
    """How many ranks of this run share this node: torchrun's LOCAL_WORLD_SIZE, srun's tasks per node
    (SLURM_STEP_TASKS_PER_NODE, e.g. "8(x2)"), else WORLD_SIZE over SLURM_NNODES; 1 for a single process."""
    import os
    import re

    env = os.environ if env is None else env
    if env.get("LOCAL_WORLD_SIZE"):
        return int(env["LOCAL_WORLD_SIZE"])
    for key in ("SLURM_STEP_TASKS_PER_NODE", "SLURM_NTASKS_PER_NODE", "SLURM_TASKS_PER_NODE"):
        match = re.match(r"\d+", env.get(key, ""))
        if match:
            return int(match.group())
    world = int(env.get("WORLD_SIZE", "1") or "1")
    nodes = int(env.get("SLURM_NNODES", "1") or "1")
    return max(1, -(-world // max(1, nodes)))


def vllm_child_command(python: Optional[str] = None) -> list[str]:
    """The child that runs vLLM: ``python`` (default: this interpreter) on the file of
    ``otr_cli.eval.vllm_child``, which imports nothing of otr, so an interpreter of another
    environment that has only vLLM can run it (eval.vllm.python)."""
    from otr_cli.eval import vllm_child

    return [python or sys.executable, vllm_child.__file__]


def encode_prompts(tokenizer, prompts: list[str]) -> list[list[int]]:
    """Token ids of each rendered prompt exactly as generate_hf encodes them (no special tokens added:
    the chat template has them), so the vLLM child does not tokenize (and add a second BOS) itself."""
    return [list(ids) for ids in tokenizer(prompts, add_special_tokens=False)["input_ids"]] if prompts else []


# After SIGTERM to the child's process group, how long it may take to exit before SIGKILL.
CHILD_GRACE_S = 10.0
# How often the parent looks for a stop request while the child generates.
POLL_S = 0.5


def end_child_group(child, grace_s: float = CHILD_GRACE_S) -> None:
    """Stop the child and whatever it started (it leads a process group of its own): SIGTERM to the
    group, SIGKILL after `grace_s`; then SIGKILL to what remains of the group (vLLM's workers)."""
    import os
    import signal
    import subprocess

    if child.poll() is None:
        try:
            os.killpg(child.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        try:
            child.wait(grace_s)
        except subprocess.TimeoutExpired:
            log.warning("the vLLM process did not end %.0f s after SIGTERM: killing it", grace_s)
    try:
        os.killpg(child.pid, signal.SIGKILL)  # the leader's exit may have left workers in the group
    except (ProcessLookupError, PermissionError):
        pass
    child.wait()


def generate_vllm(model_path: str, prompts: list[str], settings: GenerationSettings,
                  on_batch: Optional[OnBatch] = None, *, tokenizer, engine: VllmEngineSettings = VllmEngineSettings(),
                  command: Optional[list[str]] = None, timeout_s: Optional[float] = None,
                  poll: Callable[[], None] = lambda: None, grace_s: float = CHILD_GRACE_S) -> list[list[str]]:
    """The same contract as generate_hf, on vLLM in a child process (``vllm_child``) that exits when
    done, so its GPU memory is freed. model_path: an exported safetensors directory or hub id (never
    a GGUF). Prompts go as token ids encoded by `tokenizer` as generate_hf does. command: the child
    (default ``vllm_child_command()``; tests give a stand-in).

    The child runs in a session of its own: a signal sent to the parent's process group (SLURM's
    SIGUSR1/SIGTERM) reaches the parent alone. `poll` runs every POLL_S while the child works; when it
    raises (a stop request), the child's group is ended (end_child_group) and the exception goes on.
    """
    import json
    import os
    import subprocess
    import tempfile
    import time
    from pathlib import Path

    from otr_cli.models import resolve_source

    source = resolve_source(model_path)  # the built-in name becomes its cached safetensors directory
    if source.gguf_file:
        raise ConfigError(f"eval.backend=vllm cannot load the GGUF {source.gguf_file}; give a safetensors model "
                           f"directory or hub id, or use eval.backend=hf")
    engine_args = {**asdict(engine), "seed": settings.seed}
    current = torch.cuda.current_device() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    # Measured only when asked for: in `otr eval` the query starts a CUDA context in this process.
    memory = gpu_free_memory(current) if engine.gpu_memory_utilization is None else None
    if memory is not None:
        weights = model_weight_bytes(str(source.path)) // max(1, engine.tensor_parallel_size)
        engine_args["gpu_memory_utilization"] = vllm_memory_fraction(*memory, weights,
                                                                     device=f"GPU {current or 0}")
    request = {
        "model": str(source.path), "prompt_token_ids": encode_prompts(tokenizer, prompts),
        "sampling": {"n": settings.num_samples, "temperature": settings.temperature, "top_p": settings.top_p,
                     "max_tokens": settings.max_new_tokens, "stop": list(settings.stop) or None, "seed": settings.seed},
        "engine": engine_args,
    }
    env = dict(os.environ, OTR_VLLM_PARENT_PID=str(os.getpid()))  # the child dies with this process
    visible = child_visible_devices(os.environ.get("CUDA_VISIBLE_DEVICES"), current, engine.tensor_parallel_size)
    if visible is not None:
        env["CUDA_VISIBLE_DEVICES"] = visible
    from otr_cli.eval.vllm_child import MISSING_VLLM

    with tempfile.TemporaryDirectory(prefix="otr-vllm-") as scratch:
        request_path, result_path = Path(scratch) / "request.json", Path(scratch) / "result.json"
        output_path = Path(scratch) / "output.log"  # a file, not a pipe: vLLM's logging would fill a pipe
        request_path.write_text(json.dumps(request))
        started = time.perf_counter()
        with open(output_path, "w") as output:
            child = subprocess.Popen([*(command or vllm_child_command()), str(request_path), str(result_path)],
                                     env=env, stdout=output, stderr=subprocess.STDOUT, start_new_session=True)
            try:
                while True:
                    try:
                        child.wait(POLL_S)
                        break
                    except subprocess.TimeoutExpired:
                        if timeout_s is not None and time.perf_counter() - started > timeout_s:
                            raise RuntimeError(f"the vLLM process for {model_path} took more than {timeout_s} s")
                        poll()
            finally:
                end_child_group(child, grace_s)
        said = output_path.read_text(errors="replace").strip()
        if child.returncode == MISSING_VLLM:
            raise ConfigError("eval.backend=vllm needs vLLM installed (`pip install otr-cli[vllm]` on a GPU, or the "
                              "CPU build: docs/eval.md, vLLM), or eval.vllm.python naming an interpreter that has it; "
                              f"or use eval.backend=hf. The vLLM process said: {said[-500:]}")
        if child.returncode != 0 or not result_path.exists():
            raise RuntimeError(f"the vLLM process for {model_path} failed (exit code {child.returncode}); "
                               f"its last output:\n{said[-3000:]}")
        result = json.loads(result_path.read_text())
    total_s = time.perf_counter() - started
    if result.get("seconds"):
        tokens = result.get("generated_tokens", 0)
        log.info("vLLM generated %d tokens in %.2f s (%.0f tokens/s); with the start-up, %.1f s in all (%.0f tokens/s)",
                 tokens, result["seconds"], tokens / result["seconds"], total_s, tokens / total_s)
    completions = [[cut_at_stop(text, settings.stop) for text in samples] for samples in result["completions"]]
    if len(completions) != len(prompts):
        raise RuntimeError(f"the vLLM process returned {len(completions)} completions for {len(prompts)} prompts")
    if on_batch:
        on_batch(list(range(len(prompts))), completions)
    return completions


def generate_completions(model, tokenizer, prompts: list[str], *, batch_size: int, max_new_tokens: int,
                         on_batch: Optional[Callable[[int], None]] = None) -> list[str]:
    """Greedy completions, one string per prompt (kept for callers of the first version)."""
    settings = GenerationSettings(max_new_tokens=max_new_tokens)
    return [samples[0] for samples in generate_hf(
        model, tokenizer, prompts, settings, batch_size=batch_size,
        on_batch=(lambda indices, _: on_batch(len(indices))) if on_batch else None)]
