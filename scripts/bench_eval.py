"""Generated tokens/s of `otr eval`'s batched generation against a naive one-prompt-at-a-time loop.

Same model, same GSM8K prompts, same greedy settings, one run:

    .venv/bin/python scripts/bench_eval.py --n 32 --max-new-tokens 64 --batch-size 16

Tokens are counted the same way for both (the completion re-tokenized, plus the end-of-turn
token when the model stopped), so the ratio compares like with like. Writes
docs/benchmarks/bench_eval.json and prints a markdown table for docs/benchmarks/bench_eval.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from otr_cli.config import DataConfig, EvalConfig  # noqa: E402
from otr_cli.eval.benchmarks import load_benchmark  # noqa: E402
from otr_cli.eval.generation import GenerationSettings, generate_hf  # noqa: E402
from otr_cli.eval.prompts import render_prompts  # noqa: E402
from otr_cli.models import load_model, load_tokenizer  # noqa: E402


@torch.no_grad()
def naive_loop(model, tokenizer, prompts: list[str], max_new_tokens: int) -> list[str]:
    """The baseline: one `generate` call per prompt, no padding, no batching."""
    completions = []
    for prompt in prompts:
        encoded = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)
        output = model.generate(**encoded, max_new_tokens=max_new_tokens, do_sample=False,
                                pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
        completions.append(tokenizer.decode(output[0, encoded["input_ids"].shape[1]:], skip_special_tokens=True))
    return completions


def count_tokens(tokenizer, completions: list[str], max_new_tokens: int) -> int:
    """Generated tokens: the completion's tokens, +1 for the end token when it stopped early."""
    total = 0
    for text in completions:
        n = len(tokenizer(text, add_special_tokens=False)["input_ids"])
        total += min(max_new_tokens, n + (1 if n < max_new_tokens else 0))
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--data-dir", default=os.environ.get("OTR_DATA_DIR") or str(REPO / "data"),
                        help="local copy of the benchmarks, laid out as in docs/eval.md (default: $OTR_DATA_DIR, "
                             "else data/ in the checkout)")
    parser.add_argument("--benchmark", default="gsm8k")
    parser.add_argument("--n", type=int, default=32)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--output", default=str(REPO / "docs" / "benchmarks" / "bench_eval.json"))
    args = parser.parse_args()

    torch.manual_seed(0)
    tokenizer = load_tokenizer(args.model)
    model = load_model(args.model).eval()
    problems = load_benchmark(args.benchmark, EvalConfig(data_dir=args.data_dir), DataConfig(), args.n)
    prompts = render_prompts(problems, "math_cot", tokenizer)
    settings = GenerationSettings(max_new_tokens=args.max_new_tokens)

    started = time.perf_counter()
    batched = [s[0] for s in generate_hf(model, tokenizer, prompts, settings, batch_size=args.batch_size)]
    batched_s = time.perf_counter() - started
    started = time.perf_counter()
    naive = naive_loop(model, tokenizer, prompts, args.max_new_tokens)
    naive_s = time.perf_counter() - started

    batched_tokens = count_tokens(tokenizer, batched, args.max_new_tokens)
    naive_tokens = count_tokens(tokenizer, naive, args.max_new_tokens)
    result = {
        "model": args.model, "benchmark": args.benchmark, "n": len(prompts), "max_new_tokens": args.max_new_tokens,
        "batch_size": args.batch_size, "torch_threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
        "load_average_1min": os.getloadavg()[0], "machine": platform.platform(), "torch": torch.__version__,
        "otr_eval": {"seconds": batched_s, "tokens": batched_tokens, "tokens_per_s": batched_tokens / batched_s},
        "naive_loop": {"seconds": naive_s, "tokens": naive_tokens, "tokens_per_s": naive_tokens / naive_s},
        "speedup": (batched_tokens / batched_s) / (naive_tokens / naive_s),
        # Greedy outputs of batched (left-padded) and single-prompt generation should agree; fp32
        # rounding in padded attention can flip a near-tie, so this is reported, not asserted.
        "identical_completions": sum(a == b for a, b in zip(batched, naive)) / len(prompts),
    }
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    print("\n| generator | seconds | tokens | tokens/s |\n| --- | ---: | ---: | ---: |")
    for name in ("otr_eval", "naive_loop"):
        r = result[name]
        print(f"| {name} | {r['seconds']:.1f} | {r['tokens']} | {r['tokens_per_s']:.1f} |")
    print(f"\nspeedup: {result['speedup']:.2f}x; identical completions: {result['identical_completions']:.0%}")


if __name__ == "__main__":
    main()
