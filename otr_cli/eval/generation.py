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
    """vLLM's engine settings (eval.vllm.*): fraction of each GPU's memory it may claim, GPUs per
    model (tensor parallelism), and the longest prompt + completion in tokens (None: the model's)."""

    gpu_memory_utilization: float = 0.85
    tensor_parallel_size: int = 1
    max_model_len: Optional[int] = None


def child_visible_devices(parent_visible: Optional[str], current_device: Optional[int],
                          tensor_parallel_size: int) -> Optional[str]:
    """CUDA_VISIBLE_DEVICES for the vLLM child: the parent's current GPU alone when the parent uses
    one (a rank of `otr train` or a sharded `otr eval`) and the model fits on one GPU; otherwise
    unchanged (None: inherit). parent_visible: the parent's CUDA_VISIBLE_DEVICES (None: all GPUs).
    """
    if current_device is None or tensor_parallel_size != 1:
        return None
    visible = parent_visible.split(",") if parent_visible else None
    return visible[current_device] if visible else str(current_device)


def vllm_child_command(python: Optional[str] = None) -> list[str]:
    """The child that runs vLLM: ``python`` (default: this interpreter) on the file of
    ``otr_cli.eval.vllm_child``, which imports nothing of otr, so an interpreter of another
    environment that has only vLLM can run it (eval.vllm.python)."""
    from otr_cli.eval import vllm_child

    return [python or sys.executable, vllm_child.__file__]


def generate_vllm(model_path: str, prompts: list[str], settings: GenerationSettings,
                  on_batch: Optional[OnBatch] = None, *, engine: VllmEngineSettings = VllmEngineSettings(),
                  command: Optional[list[str]] = None, timeout_s: Optional[float] = None) -> list[list[str]]:
    """The same contract as generate_hf, on vLLM in a child process (``vllm_child``) that exits when
    done, so its GPU memory is freed. model_path: an exported safetensors directory or hub id (never
    a GGUF). command: the child (default ``vllm_child_command()``; tests give a stand-in).
    """
    import json
    import os
    import subprocess
    import tempfile
    from pathlib import Path

    from otr_cli.models import resolve_source

    source = resolve_source(model_path)  # the built-in name becomes its cached safetensors directory
    if source.gguf_file:
        raise ConfigError(f"eval.backend=vllm cannot load the GGUF {source.gguf_file}; give a safetensors model "
                           f"directory or hub id, or use eval.backend=hf")
    request = {
        "model": str(source.path), "prompts": prompts,
        "sampling": {"n": settings.num_samples, "temperature": settings.temperature, "top_p": settings.top_p,
                     "max_tokens": settings.max_new_tokens, "stop": list(settings.stop) or None, "seed": settings.seed},
        "engine": {**asdict(engine), "seed": settings.seed},
    }
    env = dict(os.environ)
    current = torch.cuda.current_device() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    visible = child_visible_devices(os.environ.get("CUDA_VISIBLE_DEVICES"), current, engine.tensor_parallel_size)
    if visible is not None:
        env["CUDA_VISIBLE_DEVICES"] = visible
    from otr_cli.eval.vllm_child import MISSING_VLLM

    with tempfile.TemporaryDirectory(prefix="otr-vllm-") as scratch:
        request_path, result_path = Path(scratch) / "request.json", Path(scratch) / "result.json"
        request_path.write_text(json.dumps(request))
        child = subprocess.run([*(command or vllm_child_command()), str(request_path), str(result_path)], env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, timeout=timeout_s)
        if child.returncode == MISSING_VLLM:
            raise ConfigError("eval.backend=vllm needs vLLM installed (`pip install otr-cli[vllm]`, GPU only); "
                              f"use eval.backend=hf. The vLLM process said: {child.stderr.strip()[-500:]}")
        if child.returncode != 0 or not result_path.exists():
            raise RuntimeError(f"the vLLM process for {model_path} failed (exit code {child.returncode}); "
                               f"its last output:\n{child.stderr.strip()[-3000:]}")
        result = json.loads(result_path.read_text())
    if result.get("seconds"):
        log.info("vLLM generated %d tokens in %.1f s (%.0f tokens/s)", result.get("generated_tokens", 0),
                 result["seconds"], result.get("generated_tokens", 0) / result["seconds"])
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
