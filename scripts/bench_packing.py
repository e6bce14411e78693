"""Packing and length grouping against plain padded micro-batches: `otr train` tokens/s on GSM8K.

Same model (SmolLM2-135M-Instruct), same GSM8K examples (the first steps x batch after the
seed's shuffle, data.max_length 512, SmolLM2's chat template), micro batch 8, loss=sft and
loss=otr (K=256); each case is one `otr train` in its own process:

    unpacked   right-padded to the longest example of each micro-batch (the default)
    packed     data.packing=true: the micro-batch's 8 examples in one row without padding, attention
               per example (sdpa per example, train/packed_attention.py)
    grouped    data.group_by_length=true: micro-batches of examples of similar length

Throughput is real (non-padding) input tokens per second over the steps after the first.
A shared machine's speed drifts, so the cases run in rounds with a rotating order and each ratio is the
median over rounds of the ratio measured within one round. Packed and unpacked train on the same
batches, so their loss curves must agree step by step (float rounding only); grouped batches
differ, so its curve is compared on the mean of the last half of the steps.

    python scripts/bench_packing.py [--steps 20] [--batch 8] [--rounds 2] [--cases sft-unpacked,...]

Writes docs/benchmarks/bench_packing.json and bench_packing.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
OUT_DIR = REPO / "docs" / "benchmarks"
# A local copy of GSM8K train (docs/eval.md, "Offline"): $OTR_DATA_DIR, else data/ in the checkout.
GSM8K = Path(os.environ.get("OTR_DATA_DIR") or REPO / "data") / "gsm8k" / "train.jsonl"

LAYOUTS = {
    "unpacked": [],
    "packed": ["data.packing=true"],
    "grouped": ["data.group_by_length=true"],
    # Rows of at most 512 tokens with a block-causal mask (eager attention's layout).
    "packed-masked": ["data.packing=true", "data.pack_length=512", "model.attn_implementation=eager"],
}
DEFAULT_CASES = [f"{objective}-{layout}" for objective in ("sft", "otr") for layout in ("unpacked", "packed", "grouped")]


def run_case(name: str, steps: int, batch: int, k: int, data: Path, workdir: Path) -> dict:
    from otr_cli.cli import main

    objective, layout = name.split("-", 1)
    out = workdir / name
    main(["train", "recipe=smollm2_gsm8k", f"data.source={data}", "data.validation_size=0",
          f"data.max_examples={steps * batch}", f"loss={objective}", f"loss.k={k}", "loss.sft_warmup_steps=0",
          "eval=none", f"trainer.max_steps={steps}", f"trainer.micro_batch_size={batch}", "trainer.grad_accum=1",
          "trainer.save_steps=0", "trainer.eval_steps=0", "trainer.progress=false", "trainer.report_to=[none]",
          f"run.output_dir={out}", *LAYOUTS[layout]])
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps_logged = [r for r in records if "loss" in r]
    timed = steps_logged[1:]
    return {"tokens_per_s": sum(r["tokens"] for r in timed) / sum(r["step_time_s"] for r in timed),
            "step_time_s": statistics.median(r["step_time_s"] for r in timed),
            "losses": [r["loss"] for r in steps_logged], "tokens": [r["tokens"] for r in steps_logged],
            "padding_frac": [r["padding_frac"] for r in steps_logged],
            "step_times": [r["step_time_s"] for r in steps_logged]}


# Layout name: (attention kernel, tokens per packed row; None: one row per micro-batch).
ROW_LAYOUTS = {"unpacked": ("sdpa", 0), "sdpa per example, one row (default)": ("per-example", None),
               "sdpa per example, rows of 512": ("per-example", 512),
               "sdpa with block mask, rows of 512": ("sdpa", 512),
               "sdpa with block mask, one row": ("sdpa", None)}


def row_lengths_case(batch: int, micro_batches: int, data: Path) -> dict:
    """Forward + backward of SmolLM2 (loss=sft) on the same GSM8K micro-batches laid out each way of
    ROW_LAYOUTS, the layouts of each micro-batch timed back to back in a rotating order: paired, so
    drift cancels. Returns, per layout, the median over micro-batches of (real tokens/s) / (unpacked
    real tokens/s)."""
    import time

    import torch

    from otr_cli.config import DataConfig, LossConfig, PhaseConfig, loss_options
    from otr_cli.data import build_datasets, collate_batch
    from otr_cli.data.packing import collate_packed
    from otr_cli.models import load_model, load_tokenizer
    from otr_cli.train.batches import loss_weights
    from otr_cli.train.packed_attention import VARLEN_SDPA, register_varlen_sdpa
    from otr_cli.train.token_loss_model import TokenLossLM

    tokenizer = load_tokenizer("smollm2-135m-instruct")
    data_cfg = DataConfig(source=str(data), format="question_answer", max_length=512,
                          max_examples=batch * (micro_batches + 1))
    examples = build_datasets(data_cfg, tokenizer, seed=0).train
    lm = load_model("smollm2-135m-instruct", dtype=torch.float32)
    model = TokenLossLM(lm)
    register_varlen_sdpa()
    options = loss_options(LossConfig(objective="sft"), PhaseConfig(objective="sft"))
    names = list(ROW_LAYOUTS)

    def seconds(micro: list, layout: tuple) -> float:
        kernel, capacity = layout
        lm.set_attn_implementation(VARLEN_SDPA if kernel == "per-example" else "sdpa")
        unpacked = capacity == 0
        batch_tensors = (collate_batch(micro, tokenizer.pad_token_id) if unpacked
                         else collate_packed(micro, tokenizer.pad_token_id, capacity))
        packed = {k: batch_tensors[k] for k in ("position_ids", "sequence_index") if not unpacked}
        weights = loss_weights(batch_tensors, "token", 1000, batch, 1)
        started = time.perf_counter()
        loss, _ = model(batch_tensors["input_ids"], batch_tensors["attention_mask"], batch_tensors["labels"],
                        weights, options, **packed)
        loss.backward()
        model.zero_grad(set_to_none=True)
        return time.perf_counter() - started

    seconds(examples[:batch], ROW_LAYOUTS["unpacked"])  # warm-up
    ratios: dict[str, list[float]] = {name: [] for name in names}
    for index in range(1, micro_batches + 1):
        micro = examples[index * batch: (index + 1) * batch]
        order = names[index % len(names):] + names[:index % len(names)]
        times = {name: seconds(micro, ROW_LAYOUTS[name]) for name in order}
        for name in names:
            ratios[name].append(times["unpacked"] / times[name])  # same real tokens: time ratio = tokens/s ratio
    return {name: statistics.median(values) for name, values in ratios.items()}


def case_command(name: str, args: argparse.Namespace) -> list[str]:
    return [sys.executable, __file__, "--case", name, "--steps", str(args.steps), "--batch", str(args.batch),
            "--k", str(args.k), "--data", str(args.data)]


def case_result(name: str, returncode: int, stdout: str, stderr: str) -> dict:
    if returncode != 0:
        raise RuntimeError(f"case {name} failed:\n{stdout[-3000:]}\n{stderr[-3000:]}")
    return json.loads(stdout.strip().splitlines()[-1])


def run_case_in_subprocess(name: str, args: argparse.Namespace) -> dict:
    result = subprocess.run(case_command(name, args), capture_output=True, text=True, cwd=REPO)
    return case_result(name, result.returncode, result.stdout, result.stderr)


def run_side_by_side(names: list[str], args: argparse.Namespace) -> dict:
    """The cases at the same time, each pinned to its own core with one thread: whatever the machine's
    speed does meanwhile, it does to all of them (the sequential rounds drifted by up to 1.7x)."""
    import os

    processes = {}
    for core, name in enumerate(names):
        env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
        processes[name] = subprocess.Popen(["taskset", "-c", str(core), *case_command(name, args)], cwd=REPO, env=env,
                                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    results = {}
    for name, process in processes.items():
        stdout, stderr = process.communicate()
        results[name] = case_result(name, process.returncode, stdout, stderr)
    # Once the faster case ends, the other runs alone (more cache and memory bandwidth): count only the
    # steps both ran side by side, from the end of each one's first step (the start-ups are alike).
    overlap = min(sum(result["step_times"]) for result in results.values())
    for result in results.values():
        ends, timed = 0.0, []
        for index, (seconds, tokens) in enumerate(zip(result["step_times"], result["tokens"])):
            ends += seconds
            if index > 0 and ends <= overlap:
                timed.append((seconds, tokens))
        result["tokens_per_s_whole_run"] = result["tokens_per_s"]
        result["tokens_per_s"] = sum(tokens for _, tokens in timed) / sum(seconds for seconds, _ in timed)
        result["steps_side_by_side"] = len(timed)
    return results


def positions_per_token(case: dict) -> float | None:
    """Positions the model computed per real token over the timed steps (1.00: no padding); None for
    measurements made before the trainer logged padding_frac."""
    if "padding_frac" not in case:
        return None
    pairs = list(zip(case["tokens"], case["padding_frac"]))[1:]
    return sum(tokens / (1.0 - frac) for tokens, frac in pairs) / sum(tokens for tokens, _ in pairs)


def curve_agreement(left: list[float], right: list[float]) -> float:
    """Largest step-by-step difference between two loss curves, relative to the curve's largest |loss|
    (OTR's surrogate loss crosses zero, where a per-step relative difference means nothing)."""
    return max(abs(a - b) for a, b in zip(left, right)) / max(max(abs(a) for a in left), 1e-12)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--k", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--data", type=Path, default=GSM8K)
    parser.add_argument("--cases", default=",".join(DEFAULT_CASES),
                        help=f"comma-separated <sft|otr>-<{'|'.join(LAYOUTS)}>")
    parser.add_argument("--row-micro-batches", type=int, default=8,
                        help="micro-batches timed for the row-length comparison (0: skip it)")
    parser.add_argument("--report-only", action="store_true",
                        help="rewrite the report from docs/benchmarks/bench_packing.json's measurements")
    parser.add_argument("--side-by-side", action="store_true",
                        help="run each objective's unpacked case and one other layout at the same time, one core "
                             "each (2 cases per run: a 2-core machine); rounds alternate the cores")
    parser.add_argument("--output-stem", help="file names under docs/benchmarks/ (default bench_packing, or "
                                              "bench_packing_side_by_side with --side-by-side)")
    parser.add_argument("--case", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.case == "rows":
        print(json.dumps(row_lengths_case(args.batch, args.row_micro_batches, args.data)))
        return
    if args.case:
        with tempfile.TemporaryDirectory() as workdir:
            print(json.dumps(run_case(args.case, args.steps, args.batch, args.k, args.data, Path(workdir))))
        return

    if args.report_only:
        saved = json.loads((OUT_DIR / "bench_packing.json").read_text())
        write_report(saved["command"], saved["steps"], saved["micro_batch"], saved["k"], saved["rounds"],
                     saved["row_lengths_tokens_per_s_vs_unpacked"])
        return
    names = args.cases.split(",")
    rounds = []
    for round_index in range(args.rounds):
        shift = round_index % len(names)
        order = names[shift:] + names[:shift]
        if args.side_by_side:
            layouts = [name.split("-", 1) for name in names if not name.endswith("-unpacked")]
            if len({objective for objective, _ in layouts}) != len(layouts):
                parser.error("--side-by-side pairs each objective's unpacked case with one other layout")
            rounds.append({})
            for name in names:
                objective, layout = name.split("-", 1)
                if layout != "unpacked":
                    pair = [f"{objective}-unpacked", name]
                    measured = run_side_by_side(pair if round_index % 2 == 0 else pair[::-1], args)
                    rounds[-1].update({f"{objective}-unpacked": measured[pair[0]], name: measured[name]})
        else:
            rounds.append({name: run_case_in_subprocess(name, args) for name in order})
        print(f"round {round_index + 1}/{args.rounds}: " + ", ".join(
            f"{name} {rounds[-1][name]['tokens_per_s']:.0f} tok/s" for name in names), flush=True)

    row_ratios = {}
    if args.row_micro_batches:
        command = [sys.executable, __file__, "--case", "rows", "--batch", str(args.batch), "--data", str(args.data),
                   "--row-micro-batches", str(args.row_micro_batches)]
        result = subprocess.run(command, capture_output=True, text=True, cwd=REPO)
        if result.returncode != 0:
            raise RuntimeError(f"row lengths failed:\n{result.stderr[-3000:]}")
        row_ratios = json.loads(result.stdout.strip().splitlines()[-1])
        print("row lengths: " + ", ".join(f"{k} {v:.2f}x" for k, v in row_ratios.items()), flush=True)
    command = (f"python scripts/bench_packing.py --steps {args.steps} --batch {args.batch} --rounds {args.rounds}"
               + ("" if names == DEFAULT_CASES else f" --cases {args.cases}")
               + (" --side-by-side" if args.side_by_side else "")
               + f" --row-micro-batches {args.row_micro_batches}"
               + (f" --output-stem {args.output_stem}" if args.output_stem else ""))
    write_report(command, args.steps, args.batch, args.k, rounds, row_ratios,
                 stem=args.output_stem or ("bench_packing_side_by_side" if args.side_by_side else "bench_packing"))


def write_report(command: str, steps: int, batch: int, k: int, rounds: list[dict], row_ratios: dict,
                 stem: str = "bench_packing") -> None:
    """<stem>.json (every measurement) and <stem>.md (the table) from the rounds' results."""
    names = list(rounds[0])
    cases = {name: {"tokens_per_s": statistics.median(r[name]["tokens_per_s"] for r in rounds),
                    # positions computed per real token: the most that removing padding can gain
                    "positions_per_token": positions_per_token(rounds[0][name]),
                    "step_time_s": statistics.median(r[name]["step_time_s"] for r in rounds),
                    "losses": rounds[0][name]["losses"]} for name in names}
    ratios, curves = {}, {}
    half = steps // 2
    for name in names:
        objective, layout = name.split("-", 1)
        baseline = f"{objective}-unpacked"
        if layout == "unpacked" or baseline not in names:
            continue
        ratios[name] = statistics.median(r[name]["tokens_per_s"] / r[baseline]["tokens_per_s"] for r in rounds)
        left, right = rounds[0][baseline]["losses"], rounds[0][name]["losses"]
        curves[name] = {"max_step_diff": curve_agreement(left, right),
                        "mean_loss_last_half": statistics.mean(right[half:]),
                        "baseline_mean_loss_last_half": statistics.mean(left[half:]),
                        "baseline_step_to_step_sd": statistics.stdev(left[half:]) if len(left[half:]) > 1 else 0.0}

    report = {"command": command, "machine": f"{platform.machine()}, {platform.processor() or 'cpu'}",
              "steps": steps, "micro_batch": batch, "k": k, "rounds": rounds, "cases": cases,
              "ratios_vs_unpacked": ratios, "loss_curves": curves,
              "row_lengths_tokens_per_s_vs_unpacked": row_ratios}
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    (OUT_DIR / f"{stem}.json").write_text(json.dumps(report, indent=2))
    lines = ["# Packing and length grouping: otr train tokens/s on GSM8K", "", f"Command: `{command}`", "",
             f"SmolLM2-135M-Instruct, float32 on CPU, micro batch {batch}, {steps} steps, data.max_length 512; "
             "tokens are real (non-padding) tokens. Medians over rounds; ratios are medians of within-round ratios.",
             "", "| case | tokens/s | median step (s) | positions computed per token | tokens/s vs unpacked "
             "| loss curve vs unpacked |", "| --- | --- | --- | --- | --- | --- |"]
    for name, case in cases.items():
        ratio = f"{ratios[name]:.2f}x" if name in ratios else ""
        curve = ""
        if name in curves:
            c = curves[name]
            curve = (f"same batches: max step diff {c['max_step_diff']:.1e} of the largest loss"
                     if "packed" in name
                     else f"last-half mean {c['mean_loss_last_half']:.4f} vs {c['baseline_mean_loss_last_half']:.4f} "
                          f"(step sd {c['baseline_step_to_step_sd']:.4f})")
        padding = f"{case['positions_per_token']:.2f}" if case["positions_per_token"] else ""
        lines.append(f"| {name} | {case['tokens_per_s']:.0f} | {case['step_time_s']:.2f} | {padding} | {ratio} "
                     f"| {curve} |")
    lines += ["", "Target: packed >= 1.35x unpacked tokens/s, with the same loss curve within noise."]
    if row_ratios:
        lines += ["", f"Attention kernel and row length (`data.pack_length`): forward + backward of loss=sft on "
                  f"the same micro-batches of {batch}, each layout of a micro-batch timed back to back; median of "
                  "the paired tokens/s ratios.", "", "| layout | tokens/s vs unpacked |", "| --- | --- |"]
        lines += [f"| {name} | {value:.2f}x |" for name, value in row_ratios.items()]
    (OUT_DIR / f"{stem}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
