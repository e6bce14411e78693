"""Training throughput and peak memory: `otr train` (sft, otr) against a plain transformers Trainer.

Same model (SmolLM2-135M-Instruct), same tokenized examples (synthetic_arith), same micro
batch, same number of steps; each case runs in its own process so peak RSS is its own.
Throughput is non-padding input tokens per second over the steps after the first (warm-up).

    python scripts/bench_train.py [--steps 12] [--batch 8] [--k 256] [--rounds 2]

A shared machine's speed drifts (up to 2-3x between runs of the same case), so the three cases run in
rounds with a rotating order, and each ratio is the median over rounds of the ratio measured
within one round (the cases of a round run back to back, under the same conditions).

Writes docs/benchmarks/bench_train.json and bench_train.md.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
OUT_DIR = REPO / "docs" / "benchmarks"


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def case_otr(objective: str, steps: int, batch: int, k: int, workdir: Path) -> dict:
    from otr_cli.cli import main

    out = workdir / f"otr-{objective}"
    main(["train", "recipe=smollm2_demo", f"loss={objective}", f"loss.k={k}", "loss.sft_warmup_steps=0",
          "eval=none", f"trainer.max_steps={steps}", f"trainer.micro_batch_size={batch}", "trainer.save_steps=0",
          "trainer.progress=false", f"run.output_dir={out}", "data.synthetic.num_validation=0"])
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    timed = [r for r in records if "loss" in r][1:]
    return {"tokens_per_s": sum(r["tokens"] for r in timed) / sum(r["step_time_s"] for r in timed),
            "step_time_s": statistics.median(r["step_time_s"] for r in timed)}


def case_hf_trainer(steps: int, batch: int, workdir: Path) -> dict:
    import torch
    from transformers import Trainer, TrainerCallback, TrainingArguments

    from otr_cli.config import DataConfig
    from otr_cli.data import build_datasets, collate_batch
    from otr_cli.models import builtin_model_dir, load_model, load_tokenizer

    tokenizer = load_tokenizer("smollm2-135m-instruct")
    data_cfg = DataConfig(max_length=256)
    data_cfg.synthetic.num_validation = 0
    bundle = build_datasets(data_cfg, tokenizer, seed=42)
    model = load_model(str(builtin_model_dir("smollm2-135m-instruct")), dtype=torch.float32)

    class Timer(TrainerCallback):
        def __init__(self):
            self.times, self.tokens, self._start = [], [], None

        def on_step_begin(self, args, state, control, **kwargs):
            self._start = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            self.times.append(time.perf_counter() - self._start)

    class CountingCollator:
        def __init__(self, timer):
            self.timer = timer

        def __call__(self, examples):
            batch_tensors = {key: value for key, value in collate_batch(examples, tokenizer.pad_token_id).items()
                             if key in ("input_ids", "attention_mask", "labels")}
            self.timer.tokens.append(int(batch_tensors["attention_mask"].sum()))
            return batch_tensors

    timer = Timer()
    args = TrainingArguments(output_dir=str(workdir / "hf"), per_device_train_batch_size=batch, max_steps=steps,
                             learning_rate=5e-5, lr_scheduler_type="constant", logging_steps=10**6,
                             save_strategy="no", report_to=[], use_cpu=not torch.cuda.is_available(),
                             dataloader_num_workers=0, optim="adamw_torch", max_grad_norm=1.0, seed=42,
                             remove_unused_columns=False)
    trainer = Trainer(model=model, args=args, train_dataset=bundle.train, data_collator=CountingCollator(timer),
                      callbacks=[timer])
    trainer.train()
    # The collator may prefetch one batch beyond the last step: pair times with their batches.
    tokens = timer.tokens[1:len(timer.times)]
    return {"tokens_per_s": sum(tokens) / sum(timer.times[1:]), "step_time_s": statistics.median(timer.times[1:])}


def run_case_in_subprocess(name: str, args: argparse.Namespace) -> dict:
    command = [sys.executable, __file__, "--case", name, "--steps", str(args.steps), "--batch", str(args.batch),
               "--k", str(args.k)]
    result = subprocess.run(command, capture_output=True, text=True, cwd=REPO)
    if result.returncode != 0:
        raise RuntimeError(f"case {name} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--k", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--case", choices=["hf", "otr-sft", "otr-otr"], help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.case:
        with tempfile.TemporaryDirectory() as workdir:
            if args.case == "hf":
                result = case_hf_trainer(args.steps, args.batch, Path(workdir))
            else:
                result = case_otr(args.case.split("-", 1)[1], args.steps, args.batch, args.k, Path(workdir))
        result["peak_rss_mb"] = peak_rss_mb()
        print(json.dumps(result))
        return

    names = ["hf", "otr-sft", "otr-otr"]
    rounds = []
    for round_index in range(args.rounds):
        order = names[round_index % 3:] + names[:round_index % 3]
        rounds.append({name: run_case_in_subprocess(name, args) for name in order})
        print(f"round {round_index + 1}/{args.rounds}: " + ", ".join(
            f"{name} {rounds[-1][name]['tokens_per_s']:.0f} tok/s" for name in names), flush=True)

    def median_ratio(case: str, key: str) -> float:
        return statistics.median(r[case][key] / r["hf"][key] for r in rounds)

    # Per case: the median over rounds (peak RSS does not drift; throughput does).
    cases = {name: {key: statistics.median(r[name][key] for r in rounds) for key in rounds[0][name]}
             for name in names}
    ratios = {
        "sft_tokens_per_s_vs_trainer": median_ratio("otr-sft", "tokens_per_s"),
        "sft_peak_rss_vs_trainer": median_ratio("otr-sft", "peak_rss_mb"),
        "otr_tokens_per_s_vs_trainer": median_ratio("otr-otr", "tokens_per_s"),
        "otr_peak_rss_vs_trainer": median_ratio("otr-otr", "peak_rss_mb"),
    }
    command = (f"python scripts/bench_train.py --steps {args.steps} --batch {args.batch} --k {args.k} "
               f"--rounds {args.rounds}")
    report = {"command": command, "machine": f"{platform.machine()}, {platform.processor() or 'cpu'}",
              "steps": args.steps, "micro_batch": args.batch, "k": args.k, "rounds": rounds, "cases": cases,
              "ratios": ratios}
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    (OUT_DIR / "bench_train.json").write_text(json.dumps(report, indent=2))
    lines = ["# Training throughput: otr train vs transformers Trainer", "", f"Command: `{command}`", "",
             "Medians over rounds; ratios are medians of within-round ratios.", "",
             "| case | tokens/s | median step (s) | peak RSS (MB) |", "| --- | --- | --- | --- |"]
    labels = {"hf": "transformers Trainer, SFT", "otr-sft": "otr train loss=sft", "otr-otr": f"otr train loss=otr K={args.k}"}
    for name, case in cases.items():
        lines.append(f"| {labels[name]} | {case['tokens_per_s']:.0f} | {case['step_time_s']:.2f} | "
                     f"{case['peak_rss_mb']:.0f} |")
    lines += ["", "| ratio | measured | target |", "| --- | --- | --- |",
              f"| sft tokens/s / Trainer | {ratios['sft_tokens_per_s_vs_trainer']:.2f} | >= 1.0 |",
              f"| sft peak RSS / Trainer | {ratios['sft_peak_rss_vs_trainer']:.2f} | <= 1.0 |",
              f"| otr tokens/s / Trainer | {ratios['otr_tokens_per_s_vs_trainer']:.2f} | >= 0.95 |",
              f"| otr peak RSS / Trainer | {ratios['otr_peak_rss_vs_trainer']:.2f} | |"]
    (OUT_DIR / "bench_train.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
