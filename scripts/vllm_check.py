"""The real vLLM engine against the hf backend, and inside `otr train` (run by scripts/vllm_check.sh).

1. `otr eval` of the built-in SmolLM2-135M-Instruct on the first --limit problems of --benchmark (the
   built-in synthetic_arith by default: no download; gsm8k with --data-dir or the hub), greedy,
   once with eval.backend=hf and once with eval.backend=vllm (eval.vllm.python: the vLLM venv's). Both
   load the weights in the same dtype (eval.vllm.dtype follows the hf backend's: float32 on CPU).
   Reported: identical completions (and where the first difference starts otherwise), accuracy, and
   generated tokens per second, generation alone and the whole command (start-up included). Tokens are
   counted alike for both backends: the model's tokenizer on each completion as written to gsm8k.jsonl.
2. A short `otr train` of the demo recipe with a periodic evaluation through vLLM and the final one.

Writes OUT/vllm_check.json and prints a table; exits 1 when a run fails or the backends disagree more
than --min-prefix-agreement allows (the share of completions whose first 80 characters are the same).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MODEL = "smollm2-135m-instruct"
PREFIX = 80


def run_otr(otr_python: str, args: list[str], log: Path) -> float:
    """`otr ARGS` with its output in `log`; the wall time in seconds. Raises with the log's tail on failure."""
    env = dict(os.environ, COLUMNS="400", PYTHONUNBUFFERED="1")  # rich wraps its log lines at the terminal width
    started = time.perf_counter()
    with log.open("w") as handle:
        code = subprocess.run([otr_python, "-m", "otr_cli.cli", *args], cwd=REPO, env=env, stdout=handle,
                              stderr=subprocess.STDOUT).returncode
    seconds = time.perf_counter() - started
    if code != 0:
        raise SystemExit(f"otr {' '.join(args)} failed ({code}); the end of {log}:\n{log.read_text()[-4000:]}")
    return seconds


def flat(log: Path) -> str:
    return " ".join(log.read_text().split())


def generation_seconds(log: Path, backend: str, benchmark: str) -> float:
    """Generation alone: vLLM's own clock (engine start-up excluded), or the hf backend's clock from its
    first batch to its last (the model loaded before it starts)."""
    text = flat(log)
    if backend == "vllm":
        return sum(float(s) for s in re.findall(r"vLLM generated \d+ tokens in ([\d.]+) s", text))
    return float(re.findall(re.escape(benchmark) + r": \d+/\d+ generated \(([\d.]+) s\)", text)[-1])


def first_difference(left: str, right: str) -> int:
    return next((i for i, (a, b) in enumerate(zip(left, right)) if a != b), min(len(left), len(right)))


def eval_args(backend: str, out: Path, args) -> list[str]:
    common = ["eval", f"model={MODEL}", f"eval.benchmarks=[{args.benchmark}]", f"eval.limit={args.limit}",
              f"eval.max_new_tokens={args.max_new_tokens}", "eval.cache=false", f"run.output_dir={out}",
              f"eval.backend={backend}"]
    if args.data_dir:
        common.append(f"eval.data_dir={args.data_dir}")
    if backend == "vllm":
        common += [f"eval.vllm.python={args.vllm_python}", f"eval.vllm.max_model_len={args.max_model_len}"]
    return common


def compare_backends(args, out: Path) -> dict:
    from transformers import AutoTokenizer

    from otr_cli.models import resolve_source

    tokenizer = AutoTokenizer.from_pretrained(str(resolve_source(MODEL).path))
    runs = {}
    for backend in ("hf", "vllm"):
        directory = out / f"eval_{backend}"
        log = out / f"eval_{backend}.log"
        wall = run_otr(args.otr_python, eval_args(backend, directory, args), log)
        rows = [json.loads(line) for line in (directory / "eval" / f"{args.benchmark}.jsonl").read_text().splitlines()]
        tokens = sum(len(tokenizer(r["completion"], add_special_tokens=False)["input_ids"]) for r in rows)
        seconds = generation_seconds(log, backend, args.benchmark)
        results = json.loads((directory / "eval" / "results.json").read_text())["benchmarks"][args.benchmark]
        runs[backend] = {"rows": rows, "wall_s": round(wall, 1), "generation_s": round(seconds, 2), "tokens": tokens,
                         "tokens_per_s": round(tokens / seconds, 1), "tokens_per_s_with_startup": round(tokens / wall, 1),
                         "accuracy": results["accuracy"], "correct": results["correct"], "n": results["n"]}
        if backend == "vllm":
            engine = re.findall(r"vLLM generated (\d+) tokens", flat(log))
            runs[backend]["engine_generated_tokens"] = sum(map(int, engine))
        print(f"{backend}: {runs[backend]['correct']}/{results['n']} correct, {tokens} tokens in "
              f"{seconds:.1f} s of generation, {wall:.0f} s in all", flush=True)
    hf = {r["id"]: r["completion"] for r in runs["hf"]["rows"]}
    vllm = {r["id"]: r["completion"] for r in runs["vllm"]["rows"]}
    differences = {key: first_difference(hf[key], vllm[key]) for key in hf if hf[key] != vllm.get(key)}
    agreement = {
        "problems": len(hf), "identical": len(hf) - len(differences),
        f"same_first_{PREFIX}_chars": sum(1 for key in hf if hf[key][:PREFIX] == vllm[key][:PREFIX]),
        "first_difference_at": differences,
        "median_first_difference": statistics.median(differences.values()) if differences else None,
        "both_correct": sum(1 for a, b in zip(runs["hf"]["rows"], runs["vllm"]["rows"]) if a["correct"] and b["correct"]),
    }
    for run in runs.values():
        run.pop("rows")
    return {"agreement": agreement, "backends": runs}


def process_table() -> list[tuple[int, str, int, int]]:
    """(pid, state, parent pid, session id) of every process, from /proc."""
    table = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        table.append((int(stat.parent.name), fields[0], int(fields[1]), int(fields[3])))
    return table


def killed_parent_leaves_nothing(args, out: Path) -> dict:
    """kill -9 of `otr eval` while its vLLM child's engine starts: do the child and vLLM's engine-core and
    worker processes (the child's session) end with it?"""
    import signal

    log = out / "orphans.log"
    command = [args.otr_python, "-m", "otr_cli.cli", *eval_args("vllm", out / "orphans", args)]
    with log.open("w") as handle:
        parent = subprocess.Popen(command, cwd=REPO, stdout=handle, stderr=subprocess.STDOUT)
    session, seen = None, []
    try:
        deadline = time.time() + 300
        while time.time() < deadline and parent.poll() is None and len(seen) < 3:
            time.sleep(1)  # the child leads a session of its own; wait for vLLM's engine core and worker in it
            session = session or next((pid for pid, _, ppid, sid in process_table() if ppid == parent.pid and sid == pid),
                                      None)
            seen = [pid for pid, state, _, sid in process_table() if sid == session and state != "Z"] if session else []
        parent.kill()
        parent.wait()
        time.sleep(15)
        left = [pid for pid, state, _, sid in process_table() if session and sid == session and state != "Z"]
    finally:
        if parent.poll() is None:
            parent.kill()
    for pid in left:  # ours to clean up: the session of the child this check started
        os.kill(pid, signal.SIGKILL)
    return {"processes_seen": len(seen), "left_15s_after_kill": len(left)}


def train_with_vllm(args, out: Path) -> dict:
    directory = out / "train"
    log = out / "train.log"
    overrides = ["train", "recipe=smollm2_demo", f"run.output_dir={directory}", "trainer.overwrite=true",
                 f"trainer.max_steps={args.train_steps}", "trainer.save_steps=0", "trainer.progress=false",
                 "loss.sft_warmup_steps=0", "eval.benchmarks=[synthetic_arith]", "eval.before_training=false",
                 "eval.after_warmup=false", f"eval.every_steps={args.train_steps // 2}",
                 f"eval.every_steps_limit={args.train_eval_limit}", f"eval.limit={args.train_eval_limit}",
                 "eval.backend=vllm", f"eval.vllm.python={args.vllm_python}",
                 f"eval.vllm.max_model_len={args.max_model_len}"]
    wall = run_otr(args.otr_python, overrides, log)
    records = [json.loads(line) for line in (directory / "metrics.jsonl").read_text().splitlines() if line.strip()]
    periodic = {r["step"]: {k: v for k, v in r.items() if k.startswith("eval/")}
                for r in records if any(k.startswith("eval/") for k in r)}
    summary = json.loads((directory / "summary.json").read_text())
    starts = [float(s) for s in re.findall(r"with the start-up, ([\d.]+) s in all", flat(log))]
    return {"steps": args.train_steps, "wall_s": round(wall, 1), "periodic_eval": periodic,
            "final_eval": summary["eval"], "vllm_runs": len(starts), "vllm_seconds_each": starts}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vllm-python", required=True, help="the interpreter of the venv that has vLLM")
    parser.add_argument("--otr-python", default=sys.executable)
    parser.add_argument("--out", default=str(REPO / "outputs" / "vllm_check"))
    parser.add_argument("--benchmark", default="synthetic_arith",
                        help="the problems: synthetic_arith (built in, no download) or a benchmark such as gsm8k")
    parser.add_argument("--data-dir", help="eval.data_dir holding <benchmark>/test.jsonl (default: the hub)")
    parser.add_argument("--limit", type=int, default=30)
    parser.add_argument("--max-new-tokens", type=int, default=200)
    parser.add_argument("--max-model-len", type=int, default=1024)
    parser.add_argument("--train-steps", type=int, default=4)
    parser.add_argument("--train-eval-limit", type=int, default=10)
    parser.add_argument("--min-prefix-agreement", type=float, default=0.5)
    parser.add_argument("--skip-train", action="store_true")
    args = parser.parse_args(argv)
    args.vllm_python = str(Path(args.vllm_python).absolute())
    out = Path(args.out).absolute()
    out.mkdir(parents=True, exist_ok=True)
    sys.path.insert(0, str(REPO))
    started = time.perf_counter()
    report = {"model": MODEL, "benchmark": args.benchmark, "limit": args.limit, "max_new_tokens": args.max_new_tokens,
              "vllm_cpu_kvcache_space_gib": os.environ.get("VLLM_CPU_KVCACHE_SPACE"), "cpus": os.cpu_count()}
    report.update(compare_backends(args, out))
    report["killed_parent"] = killed_parent_leaves_nothing(args, out)
    print(f"kill -9 of otr eval during vLLM's start-up: {report['killed_parent']}", flush=True)
    if not args.skip_train:
        report["train"] = train_with_vllm(args, out)
    report["total_s"] = round(time.perf_counter() - started, 1)
    (out / "vllm_check.json").write_text(json.dumps(report, indent=2))
    agreement, runs = report["agreement"], report["backends"]
    print(f"\nvLLM check ({MODEL}, first {args.limit} {args.benchmark} problems, greedy, {args.max_new_tokens} new tokens)")
    print(f"identical completions: {agreement['identical']}/{agreement['problems']}; same first {PREFIX} characters: "
          f"{agreement[f'same_first_{PREFIX}_chars']}; median first difference at character "
          f"{agreement['median_first_difference']}")
    print(f"{'backend':8} {'accuracy':>9} {'tokens':>7} {'gen s':>7} {'tok/s':>7} {'all s':>7} {'tok/s all':>9}")
    for name, run in runs.items():
        print(f"{name:8} {run['correct']:>4}/{run['n']:<4} {run['tokens']:>7} {run['generation_s']:>7.1f} "
              f"{run['tokens_per_s']:>7.1f} {run['wall_s']:>7.1f} {run['tokens_per_s_with_startup']:>9.1f}")
    if "train" in report:
        train = report["train"]
        print(f"otr train, {train['steps']} steps with vLLM evaluations: {train['wall_s']:.0f} s; periodic "
              f"{train['periodic_eval']}; final {train['final_eval']}; vLLM runs {train['vllm_seconds_each']} s")
    print(f"written: {out / 'vllm_check.json'} ({report['total_s']:.0f} s in all)")
    failures = []
    if agreement[f"same_first_{PREFIX}_chars"] < args.min_prefix_agreement * agreement["problems"]:
        failures.append(f"only {agreement[f'same_first_{PREFIX}_chars']} of {agreement['problems']} completions "
                        f"share their first {PREFIX} characters")
    orphans = report["killed_parent"]
    if orphans["processes_seen"] < 2 or orphans["left_15s_after_kill"]:
        failures.append(f"kill -9 of otr eval: {orphans} (the child and vLLM's processes must end with it)")
    if "train" in report and not report["train"]["periodic_eval"]:
        failures.append("the training run recorded no periodic evaluation")
    for failure in failures:
        print(f"FAILED: {failure}", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
