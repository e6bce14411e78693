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
5. ``vllm_beside_trainer``, ``vllm_refused_at_start``, ``vllm_stop_signal`` (CUDA with vLLM importable,
   else skipped): ``otr train`` of the random model with a periodic evaluation through vLLM, its
   gpu_memory_utilization computed from what is free beside the trainer (logged, recorded); the same
   run with eval.vllm.gpu_memory_utilization=0.99, which must be refused before its first step; and
   SIGUSR1 sent to the run's whole process group while vLLM generates, which must save, exit with the
   preempted status and leave no process of the vLLM child's session behind.

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

from vllm_check import process_table  # scripts/ is this script's directory, first on sys.path

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
        "timeouts": {"loss_tests": 90, "bench_loss": 150, "train": 80, "eval_hf": 60, "eval_vllm": 150, "vllm_train": 240},
    },
    "cpu": {
        "bench_shapes": "128x32x4096", "bench_rounds": 2,
        "model": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
                  "num_key_value_heads": 2, "head_dim": 8, "vocab_size": None},  # None: the tokenizer's size
        "train_steps": 2, "micro_batch": 2, "num_train": 8, "otr_k": 8, "eval_limit": 2, "max_new_tokens": 8,
        "timeouts": {"loss_tests": 300, "bench_loss": 300, "train": 300, "eval_hf": 300, "eval_vllm": 300,
                     "vllm_train": 300},
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


def vllm_train_overrides(device: str, profile: dict, model_dir: Path, run_dir: Path) -> list[str]:
    """A 4-step training of the random model with a periodic evaluation through vLLM at step 2."""
    return ["train", "recipe=smollm2_demo", f"model.name_or_path={model_dir}", f"run.output_dir={run_dir}",
            "trainer.overwrite=true", "data.synthetic.num_train=32", "data.synthetic.num_validation=8",
            "trainer.max_steps=4", f"trainer.micro_batch_size={profile['micro_batch']}", "trainer.progress=false",
            "trainer.save_steps=0", "loss=sft", "loss.sft_warmup_steps=0", "eval.benchmarks=[synthetic_arith]",
            "eval.before_training=false", "eval.after_warmup=false", "eval.every_steps=2",
            f"eval.every_steps_limit={profile['eval_limit']}", f"eval.limit={profile['eval_limit']}",
            f"eval.max_new_tokens={profile['max_new_tokens']}", "eval.backend=vllm", "eval.vllm.max_model_len=1024",
            *(["model.dtype=bfloat16", "deepspeed.precision=bf16"] if device == "cuda" else [])]


def session_processes(session: int) -> list[int]:
    """Live process ids whose session is `session` (the vLLM child leads one of its own)."""
    return [pid for pid, state, _, sid in process_table() if sid == session and state != "Z"]


def session_leading_children(parent: int) -> list[int]:
    """Children of `parent` that lead a session of their own: its vLLM child."""
    return [pid for pid, state, ppid, sid in process_table() if ppid == parent and sid == pid and state != "Z"]


def step_vllm_gpu(device: str, out: Path, profile: dict, model_dir: Path) -> list[dict]:
    """eval.backend=vllm inside `otr train` on a GPU: the memory default, the start-up refusal, a stop signal."""
    import re
    import signal

    names = ("vllm_beside_trainer", "vllm_refused_at_start", "vllm_stop_signal")
    if not has_module("vllm"):
        return [skipped(name, "vllm is not importable on this machine") for name in names]
    if device != "cuda":
        return [skipped(name, "a GPU path (the CPU build runs in scripts/vllm_check.sh)") for name in names]
    timeout = profile["timeouts"]["vllm_train"]
    steps = []
    run_dir = out / "vllm_beside_trainer"
    command = [sys.executable, "-m", "otr_cli.cli", *vllm_train_overrides(device, profile, model_dir, run_dir)]
    result = run_step("vllm_beside_trainer", command, out, timeout)
    text = " ".join((out / result["log"]).read_text(errors="replace").split())
    fits = re.search(r"vLLM beside the trainer: ([\d.]+) of ([\d.]+) GiB free, gpu_memory_utilization ([\d.]+)", text)
    if fits:
        result["free_gib"], result["total_gib"], result["gpu_memory_utilization"] = map(float, fits.groups())
    if result["status"] == "ok" and not re.search(r'"eval/synthetic_arith"', (run_dir / "metrics.jsonl").read_text()):
        result.update(status="failed", why="no periodic evaluation in metrics.jsonl")
    steps.append(result)

    command = [sys.executable, "-m", "otr_cli.cli", *vllm_train_overrides(device, profile, model_dir, out / "vllm_refused"),
               "eval.vllm.gpu_memory_utilization=0.99"]
    result = run_step("vllm_refused_at_start", command, out, timeout)
    text = " ".join((out / result["log"]).read_text(errors="replace").split())
    metrics = out / "vllm_refused" / "metrics.jsonl"
    trained = metrics.is_file() and '"loss"' in metrics.read_text()
    refused = "eval.vllm.gpu_memory_utilization=0.99 asks for" in text and not trained
    result.update(status="ok" if refused else "failed",
                  why="" if refused else "not refused at start-up with the eval.vllm.gpu_memory_utilization error")
    steps.append(result)

    run_dir = out / "vllm_stop_signal"
    log_path = out / "logs" / "vllm_stop_signal.log"
    command = [sys.executable, "-m", "otr_cli.cli", *vllm_train_overrides(device, profile, model_dir, run_dir)]
    log(f"vllm_stop_signal: {' '.join(command)}")
    started = time.perf_counter()
    with log_path.open("w") as handle:
        process = subprocess.Popen(command, cwd=REPO, stdout=handle, stderr=subprocess.STDOUT, start_new_session=True,
                                   env={**os.environ, "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1"})
    children: list[int] = []
    why = ""
    try:
        deadline = time.time() + timeout
        while not children and time.time() < deadline and process.poll() is None:
            time.sleep(0.5)  # the vLLM child: a process of the run whose session is its own
            children = session_leading_children(process.pid)
        time.sleep(20)  # inside vLLM's start-up or generation
        os.killpg(process.pid, signal.SIGUSR1)
        code = process.wait(timeout=120)
        left = [pid for child in children for pid in session_processes(child)]
        checkpoints = list((run_dir / "checkpoints").glob("checkpoint-*")) if (run_dir / "checkpoints").is_dir() else []
        if code != 3:
            why = f"exit code {code}, not 3 (preempted)"
        elif not children:
            why = "no vLLM child was seen"
        elif left:
            why = f"processes of the vLLM child's session left: {left}"
        elif not checkpoints:
            why = "no checkpoint saved"
    except subprocess.TimeoutExpired:
        why = "the run did not stop within 120 s of SIGUSR1"
    finally:
        if process.poll() is None:
            process.kill()
    seconds = round(time.perf_counter() - started, 1)
    log(f"vllm_stop_signal: {'ok' if not why else 'failed'} in {seconds} s {why}")
    steps.append({"step": "vllm_stop_signal", "status": "failed" if why else "ok", "why": why, "seconds": seconds,
                  "log": str(log_path.relative_to(out))})
    return steps


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
        elif step["step"] == "vllm_beside_trainer" and "gpu_memory_utilization" in step:
            detail = (f"{step['free_gib']} of {step['total_gib']} GiB free beside the trainer: gpu_memory_utilization "
                      f"{step['gpu_memory_utilization']}; {detail}")
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
    parser.add_argument("--steps", default="loss_tests,bench_loss,train,eval,vllm", help="comma-separated subset")
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
    if wanted & {"train", "eval", "vllm"}:
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
        if "vllm" in wanted:
            report["steps"] += step_vllm_gpu(args.device, out, profile, model_dir)
    report["total_seconds"] = round(time.perf_counter() - started, 1)
    (out / "gpu_check.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "gpu_check.md").write_text(markdown(report))
    log(f"wrote {out / 'gpu_check.json'} and {out / 'gpu_check.md'} in {report['total_seconds']} s")
    print(markdown(report))
    return 0 if all(step["status"] != "failed" for step in report["steps"]) else 1


if __name__ == "__main__":
    sys.exit(main())
