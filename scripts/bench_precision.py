"""CPU training in fp32 against bf16 mixed precision: speed and what it does to the loss.

The same short SFT run of SmolLM2-135M-Instruct on synthetic_arith (same seed, data, steps,
learning rate), once with `deepspeed.precision=fp32` and once with `deepspeed.precision=bf16`
(bf16 weights and activations, fp32 master weights in DeepSpeed's optimizer). Each run is its own
process. Reported per precision:

- speed: median step time and tokens/s over the steps after the first (warm-up);
- accuracy: the training loss curve, the run's own validation cross-entropy at the end, and the
  same validation cross-entropy of the exported final model re-scored in float32 (one yardstick
  for both runs: a bf16 forward pass rounds the loss itself).

    python scripts/bench_precision.py [--steps 30] [--batch 8] [--validation 32] [--rounds 2]

A shared CPU's speed drifts, so the two runs alternate in rounds (fp32 first, then bf16 first);
speed ratios are medians of within-round ratios. Writes docs/benchmarks/bench_precision.json and
bench_precision.md.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
OUT_DIR = REPO / "docs" / "benchmarks"
PRECISIONS = ("fp32", "bf16")


def cpu_features() -> dict:
    """The CPU's bf16 matrix features (the dry run and the training log name AMX bf16)."""
    from otr_cli.train.precision import cpu_bf16_features

    return cpu_bf16_features()


def fp32_validation_ce(model_dir: Path, validation: list, pad_id: int, batch: int) -> float:
    """Mean cross-entropy per supervised token of `model_dir` loaded in float32 (nats/token)."""
    import torch

    from otr_cli.data import collate_batch
    from otr_cli.models import load_model

    model = load_model(str(model_dir), dtype=torch.float32).eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(validation), batch):
            tensors = collate_batch(validation[start:start + batch], pad_id)
            logits = model(input_ids=tensors["input_ids"], attention_mask=tensors["attention_mask"]).logits
            labels = tensors["labels"][:, 1:]
            losses = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels.flatten(),
                                                       ignore_index=-100, reduction="sum")
            total += float(losses)
            count += int((labels != -100).sum())
    return total / count


def run_case(precision: str, args: argparse.Namespace, workdir: Path) -> dict:
    from otr_cli.cli import main
    from otr_cli.config import DataConfig
    from otr_cli.data import build_datasets
    from otr_cli.models import load_tokenizer

    out = workdir / precision
    code = main(["train", "recipe=smollm2_demo", "loss=sft", "eval=none", f"deepspeed.precision={precision}",
                 f"trainer.max_steps={args.steps}", f"trainer.micro_batch_size={args.batch}", "trainer.save_steps=0",
                 "trainer.progress=false", "trainer.report_to=[none]", f"run.output_dir={out}",
                 f"data.synthetic.num_validation={args.validation}"])
    if code not in (0, None):
        raise RuntimeError(f"otr train exited with {code}")
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    timed = steps[1:]
    val_ce = [r["val_ce"] for r in records if "val_ce" in r][-1]
    tokenizer = load_tokenizer("smollm2-135m-instruct")
    data_cfg = DataConfig(max_length=256)  # the synthetic_arith recipe's length
    data_cfg.synthetic.num_validation = args.validation
    bundle = build_datasets(data_cfg, tokenizer, seed=42)
    return {
        "precision": precision,
        "tokens_per_s": sum(r["tokens"] for r in timed) / sum(r["step_time_s"] for r in timed),
        "step_time_s": statistics.median(r["step_time_s"] for r in timed),
        "loss_curve": [r["loss"] for r in steps],
        "final_loss_mean_last5": statistics.mean(r["loss"] for r in steps[-5:]),
        "val_ce_own_precision": val_ce,
        "val_ce_fp32_rescored": fp32_validation_ce(out / "final", bundle.validation, tokenizer.pad_token_id,
                                                   args.batch),
    }


def run_case_in_subprocess(precision: str, args: argparse.Namespace) -> dict:
    command = [sys.executable, __file__, "--case", precision, "--steps", str(args.steps), "--batch", str(args.batch),
               "--validation", str(args.validation)]
    result = subprocess.run(command, capture_output=True, text=True, cwd=REPO)
    if result.returncode != 0:
        raise RuntimeError(f"case {precision} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def write_report(args: argparse.Namespace, rounds: list[dict]) -> None:
    def median(precision: str, key: str) -> float:
        return statistics.median(r[precision][key] for r in rounds)

    speedup = statistics.median(r["bf16"]["tokens_per_s"] / r["fp32"]["tokens_per_s"] for r in rounds)
    command = (f"python scripts/bench_precision.py --steps {args.steps} --batch {args.batch} "
               f"--validation {args.validation} --rounds {args.rounds}")
    features = cpu_features()
    report = {"command": command, "machine": f"{platform.machine()}, {platform.processor() or 'cpu'}",
              "cpu_features": features, "steps": args.steps, "micro_batch": args.batch,
              "validation_examples": args.validation, "rounds": rounds, "bf16_tokens_per_s_vs_fp32": speedup}
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    (OUT_DIR / "bench_precision.json").write_text(json.dumps(report, indent=2))
    flags = ", ".join(name for name, present in features.items() if present) or "none"
    lines = ["# CPU training precision: fp32 against bf16 (fp32 master weights)", "",
             f"Command: `{command}`", "",
             f"SFT of SmolLM2-135M-Instruct on synthetic_arith, {args.steps} steps of {args.batch} sequences; "
             f"CPU bf16 features: {flags}. Medians over {args.rounds} round(s).", "",
             "| precision | tokens/s | median step (s) | loss, mean of last 5 steps | val CE (own precision) "
             "| val CE (re-scored in fp32) |", "| --- | --- | --- | --- | --- | --- |"]
    for precision in PRECISIONS:
        lines.append(f"| {precision} | {median(precision, 'tokens_per_s'):.0f} | {median(precision, 'step_time_s'):.2f} "
                     f"| {median(precision, 'final_loss_mean_last5'):.4f} | {median(precision, 'val_ce_own_precision'):.4f} "
                     f"| {median(precision, 'val_ce_fp32_rescored'):.4f} |")
    first = rounds[0]
    marks = sorted({0, len(first["fp32"]["loss_curve"]) // 4, len(first["fp32"]["loss_curve"]) // 2,
                    3 * len(first["fp32"]["loss_curve"]) // 4, len(first["fp32"]["loss_curve"]) - 1})
    lines += ["", f"bf16 tokens/s / fp32 tokens/s: {speedup:.2f}", "",
              "Training loss at some steps (round 1):", "",
              "| step | " + " | ".join(str(m + 1) for m in marks) + " |",
              "| --- |" + " --- |" * len(marks)]
    for precision in PRECISIONS:
        curve = first[precision]["loss_curve"]
        lines.append(f"| {precision} | " + " | ".join(f"{curve[m]:.4f}" for m in marks) + " |")
    (OUT_DIR / "bench_precision.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--validation", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--case", choices=PRECISIONS, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.case:
        with tempfile.TemporaryDirectory() as workdir:
            print(json.dumps(run_case(args.case, args, Path(workdir))))
        return

    rounds = []
    for round_index in range(args.rounds):
        order = PRECISIONS if round_index % 2 == 0 else PRECISIONS[::-1]
        rounds.append({precision: run_case_in_subprocess(precision, args) for precision in order})
        print(f"round {round_index + 1}/{args.rounds}: " + ", ".join(
            f"{p} {rounds[-1][p]['tokens_per_s']:.0f} tok/s" for p in PRECISIONS), flush=True)
    write_report(args, rounds)


if __name__ == "__main__":
    main()
