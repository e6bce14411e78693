"""Evaluate one model on the configured benchmarks: prompts, cached generation, grading, result files.

Files written under `out_dir` (all atomically):
    <benchmark>.jsonl   one line per problem: id, prompt, completion, extracted, gold, correct (+ status for code)
    summary.json        {benchmark: {metric, value, n, ci95}}
    results.json        {"model": model_path, "benchmarks": {benchmark: {accuracy, correct, n, ...}}}
    generation_cache.jsonl   completions by (model, prompt, settings); lets an interrupted eval resume
"""

from __future__ import annotations

import logging
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from otr_cli.config import DataConfig, EvalConfig, ModelConfig
from otr_cli.atomic import write_json_atomic, write_jsonl_atomic
from otr_cli.eval.benchmarks import (BENCHMARK_NAMES, BenchmarkError, Problem, few_shot_examples, load_benchmark,
                                     prompt_style)
from otr_cli.eval.choice_grader import grade_choice
from otr_cli.eval.code_grader import grade_code_many
from otr_cli.eval.generation import (GenerationSettings, VllmEngineSettings, generate_hf, generate_vllm,
                                     prompt_lengths, vllm_child_command)
from otr_cli.eval.generation_cache import GenerationCache, cache_key, model_fingerprint
from otr_cli.eval.math_grader import grade_math
from otr_cli.eval.prompts import prompt_template_kwargs, render_prompts
from otr_cli.eval.sharding import SHARD_DIR, EvalShard, cache_files, merge_shards, plan_batches, write_shard
from otr_cli.eval.sandbox import SandboxLimits
from otr_cli.eval.stats import pass_at_k, wilson_interval

log = logging.getLogger("otr.eval")
CACHE_FILE = "generation_cache.jsonl"


class EvaluationStopped(Exception):
    """A stop (preemption signal) was requested during an evaluation: raised on every rank at the same
    point, after each rank stopped at its next batch boundary. Nothing is merged or written but the
    generation cache, from which a later evaluation of the same model resumes."""


@dataclass
class StopCheck:
    """How an evaluation inside `otr train` learns of a stop request, and how long a request may wait.

    received: this rank's own flag, no collective; polled before each benchmark, after each generated
    batch and before grading, so a rank stops within one batch of a signal.
    agreed: a collective (an all-reduce): every rank calls it exactly once per evaluation, after its
    share is done or abandoned; True on every rank when any rank stopped. Polled per benchmark instead,
    it would make every rank wait for the slowest at each benchmark, undoing the deal of the batches.
    longest_s: the longest stretch between two polls so far, seconds (from its creation: an export,
    a model load, one batch, a grading): how long a signal can go unnoticed by this rank.
    """

    received: Callable[[], bool]
    agreed: Callable[[], bool]
    longest_s: float = 0.0
    _last: float = field(default_factory=time.perf_counter, repr=False)  # the first stretch starts here

    def poll(self) -> bool:
        now = time.perf_counter()
        self.longest_s = max(self.longest_s, now - self._last)
        self._last = now
        return self.received()


class _StopNow(Exception):
    """This rank's stop flag was seen: abandon its share of the evaluation (caught in evaluate_model)."""


def check_eval_config(eval_cfg: EvalConfig) -> None:
    """Range and name checks with the key in the message (before anything heavy is loaded)."""
    from otr_cli.config import ConfigError

    for name in eval_cfg.benchmarks:
        if name not in BENCHMARK_NAMES:
            raise ConfigError(f"eval.benchmarks: unknown benchmark {name!r}; available: {', '.join(BENCHMARK_NAMES)}")
    for key in ("batch_size", "max_new_tokens", "num_samples", "code_workers", "sandbox_memory_mb"):
        if getattr(eval_cfg, key) <= 0:
            raise ConfigError(f"eval.{key}={getattr(eval_cfg, key)} must be > 0")
    if eval_cfg.limit is not None and eval_cfg.limit <= 0:
        raise ConfigError(f"eval.limit={eval_cfg.limit} must be > 0 (or null: all problems)")
    if eval_cfg.temperature < 0 or not 0 < eval_cfg.top_p <= 1:
        raise ConfigError(f"eval.temperature={eval_cfg.temperature} must be >= 0 and eval.top_p={eval_cfg.top_p} "
                          f"in (0, 1]")
    if eval_cfg.num_samples > 1 and eval_cfg.temperature == 0:
        raise ConfigError(f"eval.num_samples={eval_cfg.num_samples} with eval.temperature=0 would repeat one greedy "
                          f"completion; set eval.temperature (e.g. 0.8) for pass@k")
    if eval_cfg.backend not in ("hf", "vllm"):
        raise ConfigError(f"eval.backend={eval_cfg.backend!r} is not one of hf, vllm")
    vllm = eval_cfg.vllm
    if vllm.gpu_memory_utilization is not None and not 0 < vllm.gpu_memory_utilization <= 1:
        raise ConfigError(f"eval.vllm.gpu_memory_utilization={vllm.gpu_memory_utilization} must be in (0, 1] "
                          f"(or null: what is free)")
    if vllm.dtype is not None and vllm.dtype not in VLLM_DTYPES:
        raise ConfigError(f"eval.vllm.dtype={vllm.dtype!r} is not one of {', '.join(VLLM_DTYPES)} (or null: the "
                          f"hf backend's)")
    if vllm.tensor_parallel_size < 1:
        raise ConfigError(f"eval.vllm.tensor_parallel_size={vllm.tensor_parallel_size} must be >= 1")
    if vllm.max_model_len is not None and vllm.max_model_len <= eval_cfg.max_new_tokens:
        raise ConfigError(f"eval.vllm.max_model_len={vllm.max_model_len} must exceed eval.max_new_tokens="
                          f"{eval_cfg.max_new_tokens} (it bounds prompt + completion)")


VLLM_DTYPES = ("float32", "bfloat16", "float16", "auto")


def vllm_dtype(eval_cfg: EvalConfig, model_cfg: Optional[ModelConfig] = None,
               cuda: Optional[bool] = None) -> str:
    """eval.vllm.dtype, or (null) the dtype the hf backend loads the model in, so the two compare like with like."""
    if eval_cfg.vllm.dtype is not None:
        return eval_cfg.vllm.dtype
    from otr_cli.models import default_dtype

    cuda = torch.cuda.is_available() if cuda is None else cuda
    dtype = default_dtype((model_cfg or ModelConfig()).dtype, torch.device("cuda" if cuda else "cpu"))
    return str(dtype).removeprefix("torch.")


def vllm_engine(eval_cfg: EvalConfig, model_cfg: Optional[ModelConfig] = None) -> VllmEngineSettings:
    """eval.vllm.* as the child process's engine settings."""
    vllm = eval_cfg.vllm
    return VllmEngineSettings(
        gpu_memory_utilization=float(vllm.gpu_memory_utilization) if vllm.gpu_memory_utilization is not None else None,
        tensor_parallel_size=int(vllm.tensor_parallel_size),
        max_model_len=int(vllm.max_model_len) if vllm.max_model_len is not None else None,
        dtype=vllm_dtype(eval_cfg, model_cfg))


def _settings(eval_cfg: EvalConfig) -> GenerationSettings:
    return GenerationSettings(max_new_tokens=eval_cfg.max_new_tokens, num_samples=eval_cfg.num_samples,
                              temperature=eval_cfg.temperature, top_p=eval_cfg.top_p, stop=tuple(eval_cfg.stop),
                              seed=eval_cfg.seed, backend=eval_cfg.backend)


class _LazyModel:
    """Loads the model on first use only: a fully cached eval never touches the weights."""

    def __init__(self, model_path: str, model_cfg: ModelConfig, model=None):
        self.model_path, self.model_cfg, self.model = model_path, model_cfg, model

    def get(self):
        if self.model is None:
            from otr_cli.models import default_dtype, load_model

            device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
            cfg = self.model_cfg
            self.model = load_model(self.model_path, gguf_file=cfg.gguf_file, revision=cfg.revision,
                                    dtype=default_dtype(cfg.dtype, device), trust_remote_code=cfg.trust_remote_code,
                                    attn_implementation=cfg.attn_implementation).to(device).eval()
        return self.model


def _generate(prompts: list[str], keys: list[str], batches: list[list[int]], cache: GenerationCache,
              lazy: _LazyModel, tokenizer, settings: GenerationSettings, name: str,
              engine: VllmEngineSettings = VllmEngineSettings(), python: Optional[str] = None,
              after_batch: Callable[[], None] = lambda: None, poll: Callable[[], None] = lambda: None) -> list[Optional[list[str]]]:
    """Completions of the prompts in `batches` (None for the others), generating only what the cache lacks.
    `after_batch` runs once each generated batch is cached (it may raise to stop); `poll` runs every
    half second while the vLLM child generates (it may raise to stop: the child is then ended).

    A batch is all cached or all missing after an interruption (completions are cached per batch), so
    a resumed evaluation generates exactly the batches an uninterrupted one would have.
    """
    wanted = [i for batch in batches for i in batch]
    missing_batches = [[i for i in batch if cache.get(keys[i]) is None] for batch in batches]
    missing_batches = [batch for batch in missing_batches if batch]
    missing = sum(len(batch) for batch in missing_batches)
    if missing:
        log.info("%s: generating %d of %d prompts (%d cached)", name, missing, len(wanted), len(wanted) - missing)
        if settings.backend != "vllm":
            lazy.get()  # loaded before the clock starts: the times logged below are generation alone
        started, done = time.time(), [0]

        def on_batch(indices: list[int], batch: list[list[str]]) -> None:
            cache.put_many([(keys[i], samples) for i, samples in zip(indices, batch)])
            done[0] += len(indices)
            log.info("%s: %d/%d generated (%.1f s)", name, done[0], missing, time.time() - started)
            after_batch()

        if settings.backend == "vllm":
            subset = [i for batch in missing_batches for i in batch]
            generate_vllm(lazy.model_path, [prompts[i] for i in subset], settings,
                          lambda positions, batch: on_batch([subset[p] for p in positions], batch),
                          tokenizer=tokenizer, engine=engine, command=vllm_child_command(python), poll=poll)
        else:
            generate_hf(lazy.get(), tokenizer, prompts, settings, batch_size=max(map(len, missing_batches)),
                        on_batch=on_batch, batches=missing_batches)
    completions: list[Optional[list[str]]] = [None] * len(prompts)
    for i in wanted:
        completions[i] = cache.get(keys[i])
    return completions


def _grade(problems: list[Problem], completions: list[list[str]], eval_cfg: EvalConfig) -> list[list[dict]]:
    """Per problem, per sample: {"extracted" or "status", "correct"}."""
    grades: list[list[dict]] = []
    code = [(i, j) for i, p in enumerate(problems) if p.grader == "code" for j in range(len(completions[i]))]
    code_results = {}
    if code:
        limits = SandboxLimits(timeout_s=eval_cfg.sandbox_timeout_s, cpu_s=max(1, int(eval_cfg.sandbox_timeout_s)),
                               memory_mb=eval_cfg.sandbox_memory_mb)
        samples = [{"prompt": problems[i].question, "completion": completions[i][j], **problems[i].extra}
                   for i, j in code]
        code_results = dict(zip(code, grade_code_many(samples, limits, eval_cfg.code_workers)))
    for i, problem in enumerate(problems):
        per_sample = []
        for j, completion in enumerate(completions[i]):
            if problem.grader == "code":
                result = code_results[(i, j)]
                per_sample.append({"status": result.status, "correct": result.passed})
            else:
                grade = grade_math if problem.grader == "math" else grade_choice
                extracted, correct = grade(completion, problem.gold)
                per_sample.append({"extracted": extracted, "correct": correct})
        grades.append(per_sample)
    return grades


def _rows(problems: list[Problem], prompts: list[str], completions: list[list[str]], grades: list[list[dict]]
          ) -> list[dict]:
    rows = []
    for problem, prompt, samples, graded in zip(problems, prompts, completions, grades):
        row = {"id": problem.problem_id, "question": problem.question, "prompt": prompt, "gold": problem.gold,
               "completion": samples[0], **graded[0]}
        if len(samples) > 1:
            row["completions"] = samples
            row["samples_correct"] = [g["correct"] for g in graded]
        rows.append(row)
    return rows


def _scores(rows: list[dict], num_samples: int) -> dict[str, Any]:
    n = len(rows)
    correct = sum(bool(r["correct"]) for r in rows)
    low, high = wilson_interval(correct, n)
    scores: dict[str, Any] = {"accuracy": correct / n if n else 0.0, "correct": correct, "n": n,
                              "metric": "accuracy", "value": correct / n if n else 0.0, "ci95": [low, high]}
    if num_samples > 1:
        passed = [sum(r["samples_correct"]) for r in rows]
        for k in sorted({1, num_samples}):
            scores[f"pass@{k}"] = sum(pass_at_k(num_samples, c, k) for c in passed) / n if n else 0.0
        scores["metric"], scores["value"] = "pass@1", scores["pass@1"]
    return scores


def evaluate_model(model_path: str, eval_cfg: EvalConfig, data_cfg: DataConfig, out_dir: Path, tokenizer=None,
                   *, model_cfg: Optional[ModelConfig] = None, model=None, print_table: bool = False,
                   shard: EvalShard = EvalShard(), stop: Optional[StopCheck] = None) -> dict[str, Any]:
    """Scores per benchmark: {name: {"accuracy", "correct", "n", "metric", "value", "ci95", ...}}.

    model_path: hub id, local directory, .gguf or "smollm2-135m-instruct"; model_cfg supplies
    dtype, revision and gguf_file (defaults otherwise); `model` skips loading when given.
    With `shard` of several ranks every rank calls this: each generates and grades its share of
    the problems (sharding.py), rank 0 writes the files and returns the scores, the others {}.
    `stop` (inside `otr train`): raises EvaluationStopped on every rank when a stop was requested.
    """
    check_eval_config(eval_cfg)
    template_kwargs = prompt_template_kwargs(eval_cfg, data_cfg)
    out_dir = Path(out_dir)
    model_cfg = model_cfg or ModelConfig(name_or_path=model_path)
    # Every benchmark is loaded before the model, so a missing file fails in a second, not after minutes.
    problem_sets = {name: load_benchmark(name, eval_cfg, data_cfg, eval_cfg.limit) for name in eval_cfg.benchmarks}
    examples = {name: few_shot_examples(name, eval_cfg) for name in eval_cfg.benchmarks}
    out_dir.mkdir(parents=True, exist_ok=True)
    if tokenizer is None:
        from otr_cli.models import load_tokenizer

        tokenizer = load_tokenizer(model_cfg.tokenizer or model_path, gguf_file=model_cfg.gguf_file,
                                   revision=model_cfg.revision, trust_remote_code=model_cfg.trust_remote_code)
    settings = _settings(eval_cfg)
    cache = GenerationCache(shard.cache_file(out_dir) if eval_cfg.cache else None,
                            read_also=cache_files(out_dir) if eval_cfg.cache else ())
    fingerprint = model_fingerprint(model_path, model_cfg.revision)
    lazy = _LazyModel(model_path, model_cfg, model)
    rows_of: dict[str, list[dict]] = {}
    prompts_of: dict[str, list[str]] = {}
    for name, problems in problem_sets.items():
        if not problems:
            raise BenchmarkError(f"benchmark {name!r} has no problems")
        prompts_of[name] = render_prompts(problems, prompt_style(name, eval_cfg), tokenizer, data_cfg.system_prompt,
                                          data_cfg.chat_template, examples[name], template_kwargs)
    # The batches of all benchmarks are dealt at once: dealt per benchmark, rank 0 took the first batch
    # of each, and a benchmark of one batch left every other rank idle.
    plan = plan_batches({name: prompt_lengths(tokenizer, prompts) for name, prompts in prompts_of.items()},
                        eval_cfg.batch_size, eval_cfg.max_new_tokens, eval_cfg.num_samples)
    owned = shard.owned(plan)

    def stop_point() -> None:
        if stop is not None and stop.poll():
            raise _StopNow

    try:
        if settings.backend == "vllm" and len(problem_sets) > 1:
            # One vLLM engine for every benchmark: its start-up (minutes on a CPU, about a minute on a GPU)
            # is paid once per evaluation. The completions land in the cache, where the loop below finds them.
            every_prompt, every_key, every_batch = [], [], []
            for name in problem_sets:
                base = len(every_prompt)
                every_prompt += prompts_of[name]
                every_key += [cache_key(fingerprint, prompt, settings.as_key()) for prompt in prompts_of[name]]
                every_batch += [[base + i for i in batch.indices] for batch in owned if batch.benchmark == name]
            _generate(every_prompt, every_key, every_batch, cache, lazy, tokenizer, settings, ", ".join(problem_sets),
                      vllm_engine(eval_cfg, model_cfg), eval_cfg.vllm.python, after_batch=stop_point, poll=stop_point)
        for name, problems in problem_sets.items():
            stop_point()
            prompts = prompts_of[name]
            keys = [cache_key(fingerprint, prompt, settings.as_key()) for prompt in prompts]
            batches = [list(batch.indices) for batch in owned if batch.benchmark == name]
            mine = sorted(i for batch in batches for i in batch)
            completions = _generate(prompts, keys, batches, cache, lazy, tokenizer, settings, name,
                                    vllm_engine(eval_cfg, model_cfg), eval_cfg.vllm.python, after_batch=stop_point,
                                    poll=stop_point)
            stop_point()
            mine_completions = [completions[i] for i in mine]
            rows = _rows([problems[i] for i in mine], [prompts[i] for i in mine], mine_completions,
                         _grade([problems[i] for i in mine], mine_completions, eval_cfg))
            if shard.world_size == 1:
                rows_of[name] = rows
                write_jsonl_atomic(out_dir / f"{name}.jsonl", rows)
            else:
                write_shard(shard, out_dir, name, [{"index": i, **row} for i, row in zip(mine, rows)])
        if stop is not None:
            stop.poll()  # the stretch of the last grading counts too
    except _StopNow:
        log.info("stop requested: evaluation of %s left after this rank's current batch", model_path)
    if stop is not None and stop.agreed():  # every rank, once, here: its share done or abandoned
        raise EvaluationStopped(f"evaluation of {model_path} stopped on a stop request")
    if shard.world_size > 1:
        shard.barrier()  # every rank's shards are written
        if not shard.is_main:
            return {}
        for name, problems in problem_sets.items():
            rows_of[name] = merge_shards(out_dir, name, shard.world_size, len(problems))
            write_jsonl_atomic(out_dir / f"{name}.jsonl", rows_of[name])
        shutil.rmtree(out_dir / SHARD_DIR, ignore_errors=True)
    results: dict[str, Any] = {}
    for name, problems in problem_sets.items():
        results[name] = _scores(rows_of[name], eval_cfg.num_samples) | {"grader": problems[0].grader}
        log.info("eval %s on %s: %s = %.3f (%d problems)", model_path, name, results[name]["metric"],
                 results[name]["value"], len(rows_of[name]))
    write_json_atomic(out_dir / "summary.json", {name: {k: r[k] for k in ("metric", "value", "n", "ci95")}
                                                  for name, r in results.items()})
    write_json_atomic(out_dir / "results.json", {"model": model_path, "benchmarks": results})
    if print_table:
        print_results(model_path, results)
    return results


def print_results(model_path: str, results: dict[str, Any]) -> None:
    """A rich table: benchmark, metric, value with its 95% interval, n."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"eval: {model_path}")
    for column in ("benchmark", "metric", "value", "95% CI", "n"):
        table.add_column(column, justify="left" if column in ("benchmark", "metric") else "right")
    for name, r in results.items():
        table.add_row(name, r["metric"], f"{r['value']:.1%}", f"{r['ci95'][0]:.1%} - {r['ci95'][1]:.1%}", str(r["n"]))
    Console().print(table)
