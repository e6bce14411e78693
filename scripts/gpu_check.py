#!/usr/bin/env python
"""One prepared check of otr on a GPU: loss tests, loss benchmark against Liger, training, evaluation.

    python scripts/gpu_check.py --device cuda --out gpu_check_out    # on the GPU machine (via gpu_check.sh)
    python scripts/gpu_check.py --device cpu --out /tmp/gpu_check     # the same steps at tiny shapes (CI)

Steps, each in its own process with a time limit, each recorded as ok / failed / skipped (with why):

1. ``loss_tests``: tests/test_losses.py and tests/test_loss_plan.py, with ``OTR_LOSS_TEST_DEVICE``
   set so that test_loss_plan's device tests run the fused kernel on this device (float32, bf16).
2. ``bench_loss``: scripts/bench_loss.py in bf16, fused sft / otr / otr_exact and Liger's fused
   linear cross-entropy (skipped when liger_kernel is not importable): time and peak memory.
3. ``train_sft``, ``train_otr``, ``train_otr-packed``: ``otr train`` of a randomly initialised Qwen3
   model (cuda: the Qwen3-1.7B shape, bf16; cpu: a few-MB one), 20 steps (cpu: 3): tokens/s and peak
   memory; otr-packed is otr with data.packing=true (sdpa per example, or flash attention's
   variable-length path where flash_attn is installed). On CUDA each micro-step's synchronising calls
   (its host-to-device copy, forward and backward) are counted with torch.cuda.set_sync_debug_mode.
4. ``eval_hf``, ``eval_vllm``: ``otr eval`` of the same random model on a few synthetic problems
   with each backend (vllm skipped when not importable); greedy completions compared.

Writes <out>/gpu_check.json and <out>/gpu_check.md (the table for docs/benchmarks/gpu.md).
The random model's answers are meaningless: the evaluation checks that both backends start,
agree greedily, and how fast they generate.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TOKENIZER_DIR = REPO / "wheels" / "tokenizer"  # filled by gpu_check.sh --prepare (the GPU machine has no network)
BUILTIN_TOKENIZER = "smollm2-135m-instruct"

# Per device: the sizes of every step. cuda: the fused kernel's GPU targets; cpu is small enough for CI.
PROFILES = {
    "cuda": {
        "bench_shapes": "16384x4096x151936,8192x2048x151936", "bench_rounds": 3,
        # Qwen3-1.7B: 28 layers, hidden 2048, MLP 6144, 16 heads (8 KV) of 128, vocab 151936, tied.
        "model": {"hidden_size": 2048, "intermediate_size": 6144, "num_hidden_layers": 28, "num_attention_heads": 16,
                  "num_key_value_heads": 8, "head_dim": 128, "vocab_size": 151936},
        "train_steps": 20, "micro_batch": 8, "num_train": 320, "otr_k": 256, "eval_limit": 8, "max_new_tokens": 64,
        # Worst case 11.5 min (three trainings); expected well under 9 (vLLM's start-up, with its compilation, is the unknown).
        "timeouts": {"loss_tests": 90, "bench_loss": 150, "train": 80, "eval_hf": 60, "eval_vllm": 150},
    },
    "cpu": {
        "bench_shapes": "128x32x4096", "bench_rounds": 2,
        "model": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
                  "num_key_value_heads": 2, "head_dim": 8, "vocab_size": None},  # None: the tokenizer's size
        "train_steps": 2, "micro_batch": 2, "num_train": 8, "otr_k": 8, "eval_limit": 2, "max_new_tokens": 8,
        "timeouts": {"loss_tests": 300, "bench_loss": 300, "train": 300, "eval_hf": 300, "eval_vllm": 300},
    },
}


def log(message: str) -> None:
    print(f"[gpu_check {time.strftime('%H:%M:%S')}] {message}", flush=True)


def run_step(name: str, command: list[str], out: Path, timeout: int, env: dict | None = None) -> dict:
    """Run one step's command; its output goes to <out>/logs/<name>.log. Returns status and seconds."""
    log_path = out / "logs" / f"{name}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    log(f"{name}: {' '.join(command)}")
    started = time.perf_counter()
    with log_path.open("w") as handle:
        try:
            code = subprocess.run(command, cwd=REPO, stdout=handle, stderr=subprocess.STDOUT, timeout=timeout,
                                  env={**os.environ, "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1", **(env or {})}
                                  ).returncode
        except subprocess.TimeoutExpired:
            code = "timeout"
    seconds = round(time.perf_counter() - started, 1)
    status = "ok" if code == 0 else "failed"
    why = "" if code == 0 else (f"timed out after {timeout} s" if code == "timeout" else f"exit code {code}")
    if why:
        tail = log_path.read_text(errors="replace").strip().splitlines()[-3:]
        why += ": " + " | ".join(line.strip()[:200] for line in tail)
    log(f"{name}: {status} in {seconds} s {why}")
    return {"step": name, "status": status, "why": why, "seconds": seconds, "log": str(log_path.relative_to(out))}


def skipped(name: str, why: str) -> dict:
    log(f"{name}: skipped: {why}")
    return {"step": name, "status": "skipped", "why": why, "seconds": 0.0}


def has_module(name: str) -> bool:
    return importlib.util.find_spec(name) is not None


# ----------------------------------------------------------------------------- steps


def step_loss_tests(device: str, out: Path, profile: dict) -> dict:
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_losses.py",
               "tests/test_loss_plan.py"]
    return run_step("loss_tests", command, out, profile["timeouts"]["loss_tests"], env={"OTR_LOSS_TEST_DEVICE": device})


def step_bench_loss(device: str, out: Path, profile: dict) -> dict:
    cases = ["fused:sft", "fused:otr", "fused:otr_exact"] + (["liger:sft"] if has_module("liger_kernel") else [])
    bench_dir = out / "bench_loss"
    command = [sys.executable, "scripts/bench_loss.py", "--device", device, "--dtype", "bfloat16",
               "--shapes", profile["bench_shapes"], "--cases", ",".join(cases), "--rounds", str(profile["bench_rounds"]),
               "--quiet-wait", "0", "--out-dir", str(bench_dir)]
    result = run_step("bench_loss", command, out, profile["timeouts"]["bench_loss"])
    if result["status"] == "ok":
        data = json.loads((bench_dir / "bench_loss.json").read_text())
        result["results"] = [{key: row[key] for key in ("N", "H", "V", "case", "median_s", "peak_extra_bytes")}
                             for row in data["results"]]
        result["ratios"] = data["ratios"]
    if "liger:sft" not in cases:
        result["liger"] = "skipped: liger_kernel is not importable (wheels/ had no liger-kernel wheel, or it failed to install)"
    return result


def make_random_model(device: str, profile: dict, directory: Path, tokenizer_source: str) -> dict:
    """A randomly initialised Qwen3 model with the carried tokenizer, saved as safetensors."""
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from otr_cli.models import load_tokenizer

    tokenizer = load_tokenizer(tokenizer_source)
    shape = dict(profile["model"])
    shape["vocab_size"] = shape["vocab_size"] or len(tokenizer)
    config = Qwen3Config(**shape, max_position_embeddings=4096, tie_word_embeddings=True,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    with torch.device(device):
        model = Qwen3ForCausalLM(config).to(dtype)
    model.save_pretrained(directory, safe_serialization=True)
    tokenizer.save_pretrained(directory)
    parameters = sum(p.numel() for p in model.parameters())
    del model
    return {"parameters": parameters, **shape}


def step_train(device: str, out: Path, profile: dict, model_dir: Path, objective: str) -> dict:
    """objective: sft, otr, or otr-packed (otr with data.packing=true)."""
    run_dir = out / f"train_{objective}"
    loss, _, layout = objective.partition("-")
    overrides = ["recipe=smollm2_demo", f"model.name_or_path={model_dir}", f"run.output_dir={run_dir}", "trainer.overwrite=true",
                 f"data.synthetic.num_train={profile['num_train']}", "data.synthetic.num_validation=8",
                 f"trainer.max_steps={profile['train_steps']}", f"trainer.micro_batch_size={profile['micro_batch']}",
                 "trainer.progress=false", "trainer.save_steps=0", "eval=none", "loss.sft_warmup_steps=0",
                 f"loss={loss}"]
    if layout == "packed":
        overrides += ["data.packing=true"]
        if has_module("flash_attn") and device == "cuda":
            overrides += ["model.attn_implementation=flash_attention_2"]
    if loss == "otr":
        overrides += [f"loss.k={profile['otr_k']}", "loss.temperature=1.3", "loss.beta=-0.1"]
    if device == "cuda":
        overrides += ["model.dtype=bfloat16", "deepspeed.precision=bf16"]
    peak_file = out / f"train_{objective}_peak.json"
    command = [sys.executable, "scripts/gpu_check.py", "--otr-with-peak", str(peak_file), "train", *overrides]
    result = run_step(f"train_{objective}", command, out, profile["timeouts"]["train"])
    if result["status"] == "ok":
        records = [json.loads(line) for line in next(run_dir.rglob("metrics.jsonl")).read_text().splitlines()
                   if line.strip()]
        steps = [r for r in records if "tokens_per_s" in r]
        timed = steps[1:] or steps  # the first step pays for warm-up
        result["tokens_per_s"] = round(sum(r["tokens"] for r in timed) / sum(r["step_time_s"] for r in timed), 1)
        result["steps"] = len(steps)
        result["first_loss"], result["final_loss"] = steps[0]["loss"], steps[-1]["loss"]
        result.update(json.loads(peak_file.read_text()))
    return result


def step_eval(device: str, out: Path, profile: dict, model_dir: Path, backend: str) -> dict:
    if backend == "vllm" and not has_module("vllm"):
        return skipped("eval_vllm", "vllm is not importable on this machine (it does not travel as a wheel: too large)")
    if backend == "vllm" and device != "cuda":
        return skipped("eval_vllm", "vLLM needs a GPU")
    run_dir = out / f"eval_{backend}"
    command = [sys.executable, "-m", "otr_cli.cli", "eval", f"model={model_dir}", f"run.output_dir={run_dir}",
               "eval.benchmarks=[synthetic_arith]", f"eval.limit={profile['eval_limit']}",
               f"eval.max_new_tokens={profile['max_new_tokens']}", f"eval.backend={backend}", "eval.cache=false"]
    result = run_step(f"eval_{backend}", command, out, profile["timeouts"][f"eval_{backend}"])
    if result["status"] == "ok":
        rows = [json.loads(line) for line in (run_dir / "eval" / "synthetic_arith.jsonl").read_text().splitlines()
                if line.strip()]
        result["completions"] = {str(row["id"]): row["completion"] for row in rows}
        result["problems"] = len(rows)
    return result


# ----------------------------------------------------------------------------- report


def markdown(report: dict) -> str:
    lines = [f"# GPU check ({report['device']})", "",
             f"Command: `{report['command']}`  ", f"Machine: {report['machine']}; {report['date']}.", "",
             "| step | status | seconds | result |", "| --- | --- | ---: | --- |"]
    for step in report["steps"]:
        detail = step.get("why", "")
        if step["step"].startswith("train_") and step["status"] == "ok":
            detail = (f"{step['tokens_per_s']} tokens/s over steps 2-{step['steps']}, peak "
                      f"{step['peak_bytes'] / 2**30:.2f} GiB ({step['peak_method']}), final loss {step['final_loss']:.3f}")
            if step.get("syncs_per_micro_step"):
                syncs = step["syncs_per_micro_step"]
                detail += f"; synchronisations per micro-step: first {syncs[0]}, then at most {max(syncs[1:] or [0])}"
        elif step["step"].startswith("eval_") and step["status"] == "ok":
            detail = f"{step['problems']} problems"
        elif step["step"] == "bench_loss" and step["status"] == "ok":
            detail = "see below" + (f"; Liger {step['liger']}" if "liger" in step else "")
        lines.append(f"| {step['step']} | {step['status']} | {step['seconds']} | {detail} |")
    if "greedy_agreement" in report:
        lines += ["", f"Greedy agreement of the hf and vllm backends: {report['greedy_agreement']}."]
    bench = next((s for s in report["steps"] if s["step"] == "bench_loss" and s["status"] == "ok"), None)
    if bench:
        lines += ["", "## Loss benchmark (bf16, forward + backward)", "",
                  "| N | H | V | case | median time (s) | peak extra memory (MiB) |", "| ---: | ---: | ---: | --- | ---: | ---: |"]
        lines += [f"| {r['N']} | {r['H']} | {r['V']} | {r['case']} | {r['median_s']:.4f} | {r['peak_extra_bytes'] / 2**20:.1f} |"
                  for r in bench["results"]]
        if bench["ratios"]:
            lines += ["", "| ratio | shape | value | target | met |", "| --- | --- | ---: | ---: | :---: |"]
            lines += [f"| {r['ratio']} | ({r['N']}, {r['H']}, {r['V']}) | {r['value']:.3f} | <= {r['target']} | "
                      f"{'yes' if r['met'] else 'no'} |"
                      for r in bench["ratios"]]
    return "\n".join(lines) + "\n"


def describe_machine(device: str) -> str:
    import platform

    import torch

    if device == "cuda":
        return f"{torch.cuda.get_device_name(0)}, torch {torch.__version__}, CUDA {torch.version.cuda}"
    return f"{platform.processor() or platform.machine()} CPU, torch {torch.__version__}, {torch.get_num_threads()} threads"


def count_micro_step_syncs() -> list[int]:
    """On CUDA, count the synchronising CUDA calls of every training micro-step (the host-to-device copy of
    the micro-batch, then the engine's forward and backward) with torch.cuda.set_sync_debug_mode("warn");
    returns the list it fills, one count per micro-step. Nothing is counted without CUDA."""
    import warnings

    import torch

    from otr_cli.train import loop

    counts: list[int] = []
    if not torch.cuda.is_available():
        return counts
    to_device, forward_backward = loop.micro_batch_to_device, loop.Trainer.forward_backward

    def syncs_of(call):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                result = call()
            finally:
                torch.cuda.set_sync_debug_mode("default")
        return result, sum("synchroniz" in str(w.message) for w in caught)

    def counted_to_device(*args, **kwargs):
        batch, syncs = syncs_of(lambda: to_device(*args, **kwargs))
        counts.append(syncs)
        return batch

    def counted_forward_backward(self, *args, **kwargs):
        result, syncs = syncs_of(lambda: forward_backward(self, *args, **kwargs))
        counts[-1] += syncs
        return result

    loop.micro_batch_to_device = counted_to_device
    loop.Trainer.forward_backward = counted_forward_backward
    return counts


def run_otr_with_peak(peak_file: Path, argv: list[str]) -> None:
    """`otr <argv>` in this process, then write its peak memory (CUDA's max allocated, else VmHWM) and, on
    CUDA, the synchronisations of each training micro-step."""
    import torch

    from otr_cli.cli import main

    syncs = count_micro_step_syncs()
    code = 0
    try:
        main(argv)
    except SystemExit as exit_:
        code = exit_.code or 0
    if torch.cuda.is_available():
        peak = {"peak_bytes": torch.cuda.max_memory_allocated(), "peak_method": "torch.cuda.max_memory_allocated",
                "syncs_per_micro_step": syncs}
    else:
        kib = next(int(line.split()[1]) for line in Path("/proc/self/status").read_text().splitlines()
                   if line.startswith("VmHWM:"))
        peak = {"peak_bytes": kib * 1024, "peak_method": "process VmHWM"}
    peak_file.write_text(json.dumps(peak))
    sys.exit(code)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--otr-with-peak"]:
        run_otr_with_peak(Path(argv[1]), argv[2:])
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", choices=tuple(PROFILES), default="cuda")
    parser.add_argument("--out", type=Path, default=REPO / "gpu_check_out")
    parser.add_argument("--tokenizer", default=None,
                        help=f"tokenizer directory or name (default: {TOKENIZER_DIR} if present, else {BUILTIN_TOKENIZER})")
    parser.add_argument("--steps", default="loss_tests,bench_loss,train,eval", help="comma-separated subset")
    parser.add_argument("--objectives", default="sft,otr,otr-packed",
                        help="the objectives of the train step (sft,otr,otr-packed)")
    args = parser.parse_args(argv)
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            parser.error("--device cuda: torch sees no CUDA device")
    profile = PROFILES[args.device]
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    wanted = set(args.steps.split(","))
    tokenizer = args.tokenizer or (str(TOKENIZER_DIR) if TOKENIZER_DIR.is_dir() else BUILTIN_TOKENIZER)
    report = {"device": args.device, "command": "python scripts/gpu_check.py " + " ".join(argv),
              "machine": describe_machine(args.device), "date": time.strftime("%Y-%m-%d %H:%M"), "steps": []}
    started = time.perf_counter()

    if "loss_tests" in wanted:
        report["steps"].append(step_loss_tests(args.device, out, profile))
    if "bench_loss" in wanted:
        report["steps"].append(step_bench_loss(args.device, out, profile))
    if wanted & {"train", "eval"}:
        model_dir = out / "random_qwen3"
        log(f"random Qwen3 model -> {model_dir}")
        report["model"] = make_random_model(args.device, profile, model_dir, tokenizer)
        if "train" in wanted:
            for objective in args.objectives.split(","):
                report["steps"].append(step_train(args.device, out, profile, model_dir, objective))
        if "eval" in wanted:
            by_backend = {backend: step_eval(args.device, out, profile, model_dir, backend) for backend in ("hf", "vllm")}
            report["steps"] += list(by_backend.values())
            if all(step["status"] == "ok" for step in by_backend.values()):
                hf, vllm = by_backend["hf"]["completions"], by_backend["vllm"]["completions"]
                same = sum(hf[key] == vllm.get(key) for key in hf)
                report["greedy_agreement"] = f"{same} of {len(hf)} completions identical"
    report["total_seconds"] = round(time.perf_counter() - started, 1)
    (out / "gpu_check.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "gpu_check.md").write_text(markdown(report))
    log(f"wrote {out / 'gpu_check.json'} and {out / 'gpu_check.md'} in {report['total_seconds']} s")
    print(markdown(report))
    return 0 if all(step["status"] != "failed" for step in report["steps"]) else 1


if __name__ == "__main__":
    sys.exit(main())
