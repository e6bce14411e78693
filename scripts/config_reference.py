"""Generate docs/configuration-reference.md from the schema and the recipes (never edit that file by hand).

    python scripts/config_reference.py            # rewrite docs/configuration-reference.md
    python scripts/config_reference.py --check    # exit 1 when the committed file is stale (make config-reference)

What it reads: the dataclasses of otr_cli/config.py (every key, its type, its schema default and the
comment above it), each group option under recipes/<group>/*.yaml merged onto its group's schema (the
values a user gets from `<group>=<option>`), recipes/train.yaml's default choices, the recipe presets
and otr_cli/eval/benchmarks.py's benchmark registry. tests/test_config_reference.py fails when the
committed file differs from what this prints.
"""

from __future__ import annotations

import argparse
import ast
import inspect
import sys
import typing
from dataclasses import MISSING, fields, is_dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from omegaconf import OmegaConf  # noqa: E402

from otr_cli import config as schema  # noqa: E402
from otr_cli.eval import benchmarks  # noqa: E402

OUTPUT = REPO / "docs" / "configuration-reference.md"
RECIPES = REPO / "recipes"
COMMAND = "python scripts/config_reference.py"

# What a key means, for keys whose comment in otr_cli/config.py is missing or written for developers.
# A key listed neither here nor with a comment gets an empty meaning cell.
KEY_HELP = {
    "seed": "seeds the data order, initialisation RNGs and the OTR sampling generators",
    "dry_run": "compose, validate, print config + DeepSpeed JSON + batch maths, exit",
    "run.name": "name of the run; default output directory `outputs/<name>`. Recipes set it; without one it is `<model>_<data>_<objective>`, each the last path component without its extension",
    "model.revision": "hub revision (branch, tag or commit)",
    "model.trust_remote_code": "passed to `from_pretrained`",
    "model.gradient_checkpointing": "recompute activations in backward (less memory, ~30% slower)",
    "model.attn_implementation": "e.g. `sdpa`, `flash_attention_2`",
    "model.lora.enabled": "train LoRA adapters (needs `pip install 'otr-cli[peft]'`); `final/` and each checkpoint "
                          "hold the merged model and the adapter in `adapter/` (docs/checkpoints.md)",
    "model.lora.r": "LoRA rank",
    "model.lora.alpha": "LoRA scaling numerator (the update is scaled by alpha / r)",
    "model.lora.dropout": "dropout on the LoRA input",
    "model.lora.target_modules": "module names that get adapters",
    "data.split": "split of `data.source` to train on",
    "data.format": "`auto`, `messages`, `prompt_completion`, `question_answer` (docs/data.md)",
    "data.messages_field": "field holding the chat messages (`format=messages`)",
    "data.prompt_field": "field holding the prompt (`format=prompt_completion`)",
    "data.completion_field": "field holding the completion (`format=prompt_completion`)",
    "data.question_field": "field holding the question (`format=question_answer`)",
    "data.answer_field": "field holding the answer (`format=question_answer`)",
    "data.max_length": "longest example in tokens; longer ones are handled by `data.truncation`",
    "data.truncation": "`truncate` (cut at `max_length`) or `drop` (leave the example out)",
    "data.weight_field": "numeric field of each record multiplying the loss of its tokens (0: no loss, the example "
                         "keeps its place in the data order); docs/data.md, \"Loss weights\"",
    "data.validation_split": "a separate split of `data.source` used for validation (null: hold some out of train)",
    "data.validation_size": "held out of train for validation: a fraction (< 1) or a count of examples (0: none)",
    "data.shuffle": "shuffle the training examples (by `seed`)",
    "data.packing": "padding-free micro-batches: whole examples concatenated into rows, attention confined to each "
                    "example (docs/data.md, \"Packing\")",
    "data.pack_length": "most tokens in a packed row (null: the whole micro-batch in one row with sdpa and flash "
                        "attention; `data.max_length` with eager)",
    "data.synthetic.min_steps": "fewest operations in an in-distribution problem",
    "data.synthetic.max_steps": "most operations in an in-distribution problem",
    "data.synthetic.ood_steps": "operations in an out-of-distribution problem",
    "data.synthetic.num_train": "training problems generated",
    "data.synthetic.num_validation": "validation problems generated",
    "data.synthetic.num_test": "test problems per split (`synthetic_arith`, `synthetic_arith_ood`)",
    "data.synthetic.max_operand": "largest number in an in-distribution problem",
    "data.synthetic.ood_max_operand": "largest number in an out-of-distribution problem",
    "data.synthetic.seed": "seed of the generator (the problems, not the training order)",
    "loss.objective": "`sft`, `dft`, `otr`, `otr_exact` (docs/loss.md)",
    "loss.k": "OTR samples per supervised position",
    "loss.temperature": "rollout temperature (the paper: 1.3)",
    "loss.beta": "reward of a sample that is not the target (< 1; the paper: -0.1)",
    "loss.weak_signal_threshold": "warn once when the OTR match rate, averaged over the last "
                                  "`loss.weak_signal_steps` OTR steps, is below this (docs/loss.md, \"When OTR learns\")",
    "loss.weak_signal_steps": "OTR steps the two signal warnings average over",
    "loss.unreachable_threshold": "warn once when the fraction of targets with rollout probability < 0.001, averaged "
                                  "over the last `loss.weak_signal_steps` OTR steps, is above this; 1 turns it off",
    "loss.baseline": "`none`, `mean`, `loo`: reward baseline subtracted per position",
    "loss.reduction": "`token`: mean over supervised tokens of the global batch; `sequence`: per-sequence mean, "
                      "then mean over sequences",
    "loss.phases": "general schedule, e.g. `'loss.phases=[{objective:sft,steps:16},{objective:otr,steps:-1}]'`; a "
                   "phase may set `objective`, `steps` (-1: to the end, last phase only), `k`, `temperature`, "
                   "`beta`, `baseline`, `sft_weight`; replaces `sft_warmup_steps` (set one)",
    "optim.lr": "peak learning rate (AdamW)",
    "optim.weight_decay": "AdamW weight decay",
    "optim.betas": "AdamW betas",
    "optim.eps": "AdamW epsilon",
    "optim.scheduler": "`cosine`, `linear`, `constant`, `cosine_with_min_lr`, `warmup_stable_decay` (after warm-up; "
                       "transformers' schedules, see configuration.md)",
    "optim.warmup_steps": "linear warm-up steps from 0; wins over `warmup_ratio`",
    "optim.warmup_ratio": "linear warm-up as a fraction of the run's steps, rounded up",
    "optim.max_grad_norm": "gradient clipping (DeepSpeed `gradient_clipping`)",
    "deepspeed.zero_stage": "ZeRO stage 0-3 (docs/distributed.md)",
    "deepspeed.offload_optimizer": "optimizer state on CPU (stage >= 1)",
    "deepspeed.offload_param": "parameters on CPU (stage 3)",
    "deepspeed.precision": "how the run trains: `auto` (bf16 on GPUs that compute in bf16, else fp32; fp32 on CPUs, and bf16 when only `model.dtype=bfloat16` is set), `fp32`, `bf16`, `fp16`; bf16 and fp16 keep fp32 master weights (docs/configuration.md, Precision)",
    "deepspeed.extra": "merged into the generated DeepSpeed JSON, e.g. "
                       "`+deepspeed.extra.zero_optimization.reduce_bucket_size=5e7`",
    "trainer.epochs": "epochs when `max_steps` is -1 (fractions allowed)",
    "trainer.micro_batch_size": "sequences per forward per process",
    "trainer.grad_accum": "micro-batches per optimizer step",
    "trainer.log_steps": "a `metrics.jsonl` line every N steps",
    "trainer.save_steps": "checkpoint every N steps (0: only at the end)",
    "trainer.save_total_limit": "keep the N newest checkpoints (null: all)",
    "trainer.resume": "`auto` (newest complete checkpoint in the output dir), `never`, or a checkpoint path",
    "trainer.progress": "live progress bar on a terminal (plain lines otherwise)",
    "trainer.report_to": "experiment trackers: a list of `tensorboard`, `wandb`, `mlflow`; `[none]`; `[auto]`: "
                         "tensorboard when installed (docs/configuration.md, \"Experiment trackers\")",
    "eval.benchmarks": "benchmarks run on `final/` at the end (the list below)",
    "eval.after_warmup": "also evaluate at the end of every schedule phase but the last (the SFT warm-up)",
    "eval.limit": "first N problems of each benchmark (null: all)",
    "eval.batch_size": "prompts per generation batch",
    "eval.max_new_tokens": "generation budget per completion",
    "eval.data_dir": "local copy of the benchmarks, `<data_dir>/<benchmark>/test.jsonl` (docs/eval.md, "
                     "\"Offline: a local copy\"); null: hub ids",
    "eval.custom_question_field": "question field of `eval.custom_path`",
    "eval.custom_answer_field": "answer field of `eval.custom_path`",
    "eval.custom_grader": "`math`, `choice` or `code`: how `custom` is graded",
    "eval.backend": "`hf` (transformers generate) or `vllm` (GPU, or vLLM's CPU build; docs/eval.md, \"vLLM\")",
    "eval.custom_path": "the `custom` benchmark's file (.jsonl, .json or .parquet)",
    "eval.vllm.gpu_memory_utilization": "fraction of each GPU's total memory vLLM may claim, in (0, 1]; null: what is "
                                        "free on the rank's GPU when vLLM starts, less a margin (checked at the start "
                                        "of `otr train`); ignored on CPU",
    "eval.temperature": "sampling temperature (0: greedy)",
    "eval.sandbox_timeout_s": "code benchmarks: time limit of one sample's tests in the sandbox",
    "eval.sandbox_memory_mb": "code benchmarks: memory limit of one sandbox",
    "eval.code_workers": "code benchmarks: sandboxes running at once",
    "eval.top_p": "nucleus sampling (with `eval.temperature` > 0)",
    "eval.seed": "seed of sampled generations",
    "eval.every_steps_limit": "problems per benchmark for `eval.every_steps`",
    "launcher.name": "where `-m` sweeps run: `local` (one point after another) or `slurm` (one job array, "
                     "docs/slurm.md)",
    "launcher.partition": "SLURM partition of each point",
    "launcher.nodes": "nodes of ONE point",
    "launcher.tasks_per_node": "processes per node (one per GPU)",
    "launcher.cpus_per_task": "CPUs per task (null with GPUs: the node's CPUs / tasks_per_node)",
    "launcher.mem_gb": "memory per node in GB (0: all of it; null with GPUs: all of it)",
    "launcher.timeout_min": "time limit of a point in minutes",
    "launcher.gpus_per_node": "GPUs per node of ONE point (null: none); set `tasks_per_node` to the same number",
    "launcher.signal": "the signal SLURM sends before the time limit: the run saves at the next step and requeues "
                       "itself (docs/slurm.md)",
    "launcher.signal_delay_s": "seconds before the time limit that SLURM sends `launcher.signal`; a save slower than "
                               "half of it is warned about (docs/checkpoints.md)",
    "launcher.account": "SLURM account",
    "launcher.qos": "SLURM quality of service",
    "launcher.constraint": "SLURM node constraint",
}


def field_comments(cls: type) -> dict[str, str]:
    """The `#` comment lines right above each field of a dataclass, joined into one sentence each."""
    source = inspect.getsource(cls)
    lines = source.splitlines()
    comments: dict[str, str] = {}
    for node in ast.parse(source).body[0].body:
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            above, row = [], node.lineno - 2
            while row >= 0 and lines[row].strip().startswith("#"):
                above.insert(0, lines[row].strip().lstrip("#").strip())
                row -= 1
            if above:
                comments[node.target.id] = " ".join(above)
    return comments


def type_name(annotation: object) -> str:
    """A dataclass field's type as users read it: `int or null`, `list of str`, `mapping`."""
    text = annotation if isinstance(annotation, str) else getattr(annotation, "__name__", str(annotation))
    hint = eval(text, {**vars(typing), **vars(schema)})  # the annotations are strings (from __future__)
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is typing.Union and type(None) in args:
        rest = [a for a in args if a is not type(None)]
        return f"{type_name(rest[0])} or null"
    if origin in (list, typing.List):
        inner = args[0]
        return f"list of {'phases' if is_dataclass(inner) else type_name(inner)}"
    if origin in (dict, typing.Dict) or hint is typing.Any:
        return "mapping"
    return {bool: "bool", int: "int", float: "float", str: "str"}.get(hint, str(hint))


def schema_rows(cls: type, prefix: str) -> list[tuple[str, str, str]]:
    """(dotted key, type, meaning) for every leaf key of a dataclass, nested dataclasses expanded."""
    comments = field_comments(cls)
    rows = []
    for f in fields(cls):
        key = f"{prefix}{f.name}"
        default = f.default_factory() if f.default_factory is not MISSING else f.default
        if is_dataclass(default):
            rows.extend(schema_rows(type(default), key + "."))
            continue
        rows.append((key, type_name(f.type), KEY_HELP.get(key) or comments.get(f.name, "")))
    return rows


def fmt(value: object) -> str:
    """A config value as it is typed on the command line."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(fmt(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {fmt(v)}" for k, v in value.items()) + "}"
    return str(value) if value != "" else '""'


def cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def lookup(tree: object, dotted: str) -> object:
    for part in dotted.split("."):
        tree = tree[part]
    return tree


def read_option(group: str, path: Path) -> dict:
    """A group option's own keys: its file without Hydra's `defaults`/`hydra`, at the group's level."""
    node = OmegaConf.to_container(OmegaConf.load(path)) or {}
    if path.read_text().lstrip().startswith("# @package _global_"):
        node = node.get(group, {})
    return {k: v for k, v in node.items() if k not in ("defaults", "hydra")}


def description(path: Path) -> str:
    """The first sentence of a YAML file's leading comment (skipping `@package` lines)."""
    words = []
    for line in path.read_text().splitlines():
        if not line.startswith("#"):
            break
        text = line.lstrip("#").strip()
        if text.startswith("@package") or (words and not text):
            if words:
                break
            continue
        if text.startswith(("`otr", "otr ")):
            break
        words.append(text)
    sentence = " ".join(words)
    end = sentence.find(". ")
    return sentence[:end + 1] if end >= 0 else sentence


def default_choices(primary: str = "train.yaml") -> dict[str, str]:
    """Group -> option that a primary config (recipes/train.yaml, eval_main.yaml) picks when the command line does not."""
    choices = {}
    for entry in OmegaConf.to_container(OmegaConf.load(RECIPES / primary))["defaults"]:
        if isinstance(entry, dict):
            for group, option in entry.items():
                if not group.startswith("override "):
                    choices[group] = option
    return choices


def group_section(group: str, cls: type, chosen: str | None) -> list[str]:
    options = sorted(p.stem for p in (RECIPES / group).glob("*.yaml"))
    merged = {}
    for option in options:
        own = read_option(group, RECIPES / group / f"{option}.yaml")
        merged[option] = (OmegaConf.to_container(OmegaConf.merge(OmegaConf.structured(cls), own)), own)
    base = OmegaConf.to_container(OmegaConf.structured(cls))
    lines = [f"## `{group}`", "", f"Options (`{group}=NAME`, files `recipes/{group}/NAME.yaml`):", ""]
    for option in options:
        mark = " (the default)" if option == chosen else ""
        about = description(RECIPES / group / f"{option}.yaml")
        lines.append(f"- `{option}`{mark}" + (f": {about}" if about else ""))
    header = ["key", "type", "schema", *[f"`{o}`" for o in options], "meaning"]
    lines += ["", "| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    for key, kind, meaning in schema_rows(cls, f"{group}."):
        inner = key[len(group) + 1:]
        values = []
        for option in options:
            value, own = merged[option]
            text = fmt(lookup(value, inner))
            try:
                lookup(own, inner)
                text = f"**{text}**"  # the option's file sets it
            except (KeyError, TypeError):
                pass
            values.append(text)
        row = [f"`{key}`", kind, fmt(lookup(base, inner)), *values, meaning]
        lines.append("| " + " | ".join(cell(v) for v in row) + " |")
    return lines + [""]


def flatten(node: dict, prefix: str = "") -> list[tuple[str, object]]:
    items = []
    for key, value in node.items():
        if isinstance(value, dict) and value:
            items.extend(flatten(value, f"{prefix}{key}."))
        else:
            items.append((f"{prefix}{key}", value))
    return items


def recipe_section() -> list[str]:
    lines = ["## Recipes", "",
             "`recipe=NAME` (files `recipes/recipe/NAME.yaml`) picks options of the groups above and sets keys "
             "on top of them; the command line beats both.", "",
             "| recipe | what it is | picks | sets |", "| --- | --- | --- | --- |"]
    for path in sorted((RECIPES / "recipe").glob("*.yaml")):
        node = OmegaConf.to_container(OmegaConf.load(path)) or {}
        picks = []
        for entry in node.get("defaults", []):
            if isinstance(entry, dict):
                picks += [f"{k.replace('override /', '')}={v}" for k, v in entry.items()]
            elif entry != "_self_":
                picks.append(f"builds on `{entry}`")
        if node.get("hydra", {}).get("sweeper"):
            params = node["hydra"]["sweeper"].get("params", {})
            picks += [f"sweeps {k}={v}" for k, v in params.items()]
        sets = [f"{k}={fmt(v)}" for k, v in flatten({k: v for k, v in node.items() if k not in ("defaults", "hydra")})]
        row = [f"`{path.stem}`", description(path), ", ".join(picks), ", ".join(sets)]
        lines.append("| " + " | ".join(cell(v) for v in row) + " |")
    return lines + [""]


def benchmark_section() -> list[str]:
    in_options = {}
    for path in sorted((RECIPES / "eval").glob("*.yaml")):
        for name in read_option("eval", path).get("benchmarks", []):
            in_options.setdefault(name, []).append(f"`{path.stem}`")
    lines = ["## Benchmarks", "",
             "Names for `eval.benchmarks` (otr_cli/eval/benchmarks.py). A benchmark is read from `eval.paths.NAME` "
             "(a file) when set, else from `eval.data_dir/FILE`, else from the hub.", "",
             "| name | hub id (subset, split) | file under `eval.data_dir` | prompt | in `eval=` options |",
             "| --- | --- | --- | --- | --- |"]
    for name in benchmarks.BENCHMARK_NAMES:
        spec = benchmarks.SPECS.get(name)
        if spec is not None:
            hub_id, subset, split = spec.hub
            hub = f"`{hub_id}` ({', '.join(p for p in (subset, split) if p)})"
            local, prompt = f"`{spec.local}`", spec.prompt_style
        elif name in benchmarks.SYNTHETIC:
            hub, local, prompt = f"generated (`data.synthetic.*`, split {benchmarks.SYNTHETIC[name]})", "-", "as trained"
        else:
            hub, local, prompt = "-", "`eval.custom_path`", "by `eval.custom_grader`"
        row = [f"`{name}`", hub, local, prompt, ", ".join(in_options.get(name, [])) or "-"]
        lines.append("| " + " | ".join(cell(v) for v in row) + " |")
    return lines + [""]


def top_level_section() -> list[str]:
    groups = set(schema.GROUP_SCHEMAS)
    lines = ["## Keys outside the groups", "", "| key | type | default | meaning |", "| --- | --- | --- | --- |"]
    comments = field_comments(schema.TrainConfig)
    base = OmegaConf.to_container(OmegaConf.structured(schema.TrainConfig))
    # Keys recipes/train.yaml itself sets (run.name): what `otr train` without a recipe gets, not the schema's.
    primary = read_option("", RECIPES / "train.yaml")
    for f in fields(schema.TrainConfig):
        if f.name in groups:
            continue
        default = f.default_factory() if f.default_factory is not MISSING else f.default
        rows = (schema_rows(type(default), f"{f.name}.") if is_dataclass(default)
                else [(f.name, type_name(f.type), KEY_HELP.get(f.name) or comments.get(f.name, ""))])
        for key, kind, meaning in rows:
            try:
                default = f"`{fmt(lookup(primary, key))}` (train.yaml)"
            except (KeyError, TypeError):
                default = fmt(lookup(base, key))
            lines.append("| " + " | ".join(cell(v) for v in [f"`{key}`", kind, default, meaning]) + " |")
    return lines + [""]


def render() -> str:
    chosen = default_choices()
    picks = ", ".join(f"`{g}={o}`" for g, o in chosen.items() if not g.startswith("hydra"))
    eval_picks = ", ".join(f"`{g}={o}`" for g, o in default_choices("eval_main.yaml").items()
                           if not g.startswith("hydra"))
    lines = [
        "# Configuration reference",
        "",
        f"<!-- Generated by `{COMMAND}` from otr_cli/config.py and recipes/. Do not edit by hand: "
        "rerun the generator (`make config-reference`). -->",
        "",
        "Every key of `otr train` (and of `otr eval`, which uses the `model`, `data` and `eval` groups), "
        "with its type and what each option of its group sets it to. How recipes, groups and the command "
        "line combine: docs/configuration.md.",
        "",
        "How to read a group's table: **schema** is the value when no file sets the key; each option's "
        "column is what `GROUP=OPTION` gives, **bold** where the option's file sets the key. A recipe may "
        "change the value again (\"Recipes\" below), and the command line beats everything. "
        "`otr train ... dry_run=true` prints the values a run will use.",
        "",
        f"`otr train` without arguments composes {picks}; `otr eval` composes {eval_picks}.",
        "",
    ]
    lines += recipe_section()
    for group, cls in schema.GROUP_SCHEMAS.items():
        lines += group_section(group, cls, chosen.get(group))
    lines += top_level_section()
    lines += benchmark_section()
    return "\n".join(lines).rstrip("\n") + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="exit 1 when the committed file differs")
    parser.add_argument("--output", type=Path, default=OUTPUT)
    args = parser.parse_args(argv)
    text = render()
    if args.check:
        if not args.output.is_file() or args.output.read_text() != text:
            print(f"{args.output} is stale: run `{COMMAND}`", file=sys.stderr)
            return 1
        return 0
    args.output.write_text(text)
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
