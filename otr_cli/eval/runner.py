"""Evaluate one model on the configured benchmarks; write predictions and results."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Optional

import torch

from otr_cli.config import DataConfig, EvalConfig
from otr_cli.data import render_prompt
from otr_cli.eval.benchmarks import load_benchmark
from otr_cli.eval.generation import generate_completions
from otr_cli.eval.grading import answers_match, extract_answer
from otr_cli.models import load_model, load_tokenizer

log = logging.getLogger("otr.eval")


def evaluate_model(model_path: str, eval_cfg: EvalConfig, data_cfg: DataConfig, out_dir: Path,
                   tokenizer=None) -> dict[str, Any]:
    """Accuracy per benchmark: {name: {"accuracy", "correct", "n"}}; predictions in out_dir."""
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = tokenizer or load_tokenizer(model_path)
    model = load_model(model_path, dtype=torch.bfloat16 if torch.cuda.is_available() else torch.float32)
    model.to("cuda" if torch.cuda.is_available() else "cpu").eval()
    results: dict[str, Any] = {}
    for name in eval_cfg.benchmarks:
        problems = load_benchmark(name, eval_cfg, data_cfg, eval_cfg.limit)
        prompts = [render_prompt(_messages(p.question, data_cfg), tokenizer, data_cfg.chat_template)
                   for p in problems]
        completions = generate_completions(model, tokenizer, prompts, batch_size=eval_cfg.batch_size,
                                           max_new_tokens=eval_cfg.max_new_tokens)
        rows = []
        for problem, completion in zip(problems, completions):
            predicted = extract_answer(completion)
            rows.append({"id": problem.problem_id, "question": problem.question, "gold": problem.gold,
                         "completion": completion, "extracted": predicted,
                         "correct": answers_match(predicted, problem.gold)})
        correct = sum(r["correct"] for r in rows)
        results[name] = {"accuracy": correct / max(len(rows), 1), "correct": correct, "n": len(rows)}
        _write_jsonl(out_dir / f"{name}.jsonl", rows)
        log.info("eval %s on %s: %d/%d correct", model_path, name, correct, len(rows))
    tmp = out_dir / ".results.json.tmp"
    tmp.write_text(json.dumps({"model": model_path, "benchmarks": results}, indent=2))
    tmp.replace(out_dir / "results.json")
    del model
    return results


def _messages(question: str, data_cfg: DataConfig) -> list[dict[str, str]]:
    messages = [{"role": "system", "content": data_cfg.system_prompt}] if data_cfg.system_prompt else []
    return messages + [{"role": "user", "content": question}]


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("w") as handle:
        for row in rows:
            handle.write(json.dumps(row) + "\n")
    tmp.replace(path)
