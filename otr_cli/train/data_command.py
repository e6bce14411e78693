"""`otr data`: the training run's data, tokenized as `otr train` would, shown before any weights load.

Composes the same config as `otr train` (app.run_hydra, the same recipes, schema and checks), loads the
tokenizer alone, builds the data through the tokenized-data cache (so the training run that follows
starts from a cache hit) and shows: the data report, a token-length histogram, the padding of the
run's own micro-batches with and without packing (train/batches.StepPlan, data/packing.pack_rows), the
optimizer steps per epoch, and a few examples with their supervised text marked.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Optional

from otr_cli.app import run_hydra, sources_line
from otr_cli.errors import UserError, fail

DEFAULT_EXAMPLES = 3

USAGE = f"""usage: otr data [overrides ...] [--examples N] [--ranks N] [--json]

Builds the training data exactly as `otr train` with the same overrides would (tokenizer only, no model
weights; the tokenization cache is filled for the run), then shows the data report, a token-length
histogram, the padding of the run's micro-batches unpacked and packed, the optimizer steps per epoch
and the first examples with their supervised text marked.

  --examples N   examples to show (default {DEFAULT_EXAMPLES}; 0: none)
  --ranks N      ranks the steps are counted for (default: WORLD_SIZE or the SLURM tasks of this shell,
                 else launcher.nodes x launcher.tasks_per_node)
  --json         one JSON object on stdout instead of the report

The overrides are those of `otr train`: `otr train --help` lists every config group and option.
"""


@dataclass
class DataOptions:
    """The plain flags of `otr data`, taken off the command line before Hydra sees the overrides."""

    examples: int = DEFAULT_EXAMPLES  # examples printed with their supervised text marked
    as_json: bool = False  # one JSON object on stdout instead of the report
    ranks: Optional[int] = None  # processes of the training run; None: from the environment or launcher.*


def _whole_number(flag: str, value: str, minimum: int) -> int:
    try:
        number = int(value)
    except ValueError:
        number = None
    if number is None or number < minimum:
        raise UserError(f"{flag} needs a whole number >= {minimum}, got {value!r} (e.g. {flag} {max(minimum, 2)})")
    return number


def split_flags(args: list[str]) -> tuple[DataOptions, list[str]]:
    """(the flags --examples N, --ranks N, --json; the Hydra overrides left), in the order given."""
    options, overrides = DataOptions(), []
    position = 0
    while position < len(args):
        arg = args[position]
        name, has_value, value = arg.partition("=")
        if arg == "--json":
            options.as_json = True
        elif name in ("--examples", "--ranks"):
            if not has_value:
                if position + 1 >= len(args):
                    raise UserError(f"{name} needs a value, e.g. {name} 2")
                position += 1
                value = args[position]
            if name == "--examples":
                options.examples = _whole_number(name, value, 0)
            else:
                options.ranks = _whole_number(name, value, 1)
        else:
            overrides.append(arg)
        position += 1
    return options, overrides


def data_entry(args: list[str]) -> int:
    """`otr data [--examples N] [--ranks N] [--json] [overrides]`."""
    if any(arg in ("-h", "--help") for arg in args):
        print(USAGE, end="")
        return 0
    try:
        options, overrides = split_flags(args)
    except UserError as err:
        fail(str(err))

    def task(cfg) -> None:
        data_task(cfg, options)

    return run_hydra(task, "train", "data", overrides)


def data_task(cfg, options: DataOptions) -> None:
    """Body of `otr data` (called by Hydra with the composed config)."""
    from otr_cli.config import validate

    try:
        typed = validate(cfg)
        inspection = inspect_run_data(typed, options)
    except UserError as err:
        fail(str(err))
    if options.as_json:
        print(json.dumps(inspection.as_dict()))
    else:
        print_inspection(inspection)


def default_world_size(typed) -> int:
    """The ranks a training run would have: the launch environment's (WORLD_SIZE, SLURM), else launcher.*."""
    from otr_cli.train.distributed import world_size_from_env

    from_env = world_size_from_env()
    return from_env if from_env > 1 else typed.launcher.nodes * typed.launcher.tasks_per_node


def packed_rows_for(typed) -> tuple[Optional[str], Optional[int]]:
    """(attention kernel packed rows would use, tokens per row or None for one row per micro-batch).

    The kernel is model.attn_implementation, unset taken as sdpa (Transformers' default), which packing
    switches to its per-example form; (None, None) when packing refuses the kernel.
    """
    from otr_cli.train.packed_attention import PACKED_ATTENTION, VARLEN_SDPA, packed_row_capacity

    implementation = typed.model.attn_implementation or "sdpa"
    if implementation not in PACKED_ATTENTION:
        return None, None
    implementation = VARLEN_SDPA if implementation == "sdpa" else implementation
    return implementation, packed_row_capacity(typed.data, implementation)


def epoch_micro_batches(typed, lengths: list[int], world_size: int, max_tokens_per_batch: int) -> list[list[int]]:
    """Every micro-batch (example indices) of the first epoch's optimizer steps, on every rank, as training
    plans them (train/batches.StepPlan). One rank with grad_accum x world size micro-batches a step makes
    the same micro-batches as world size ranks (StepPlan's docstring), and is cheaper to walk."""
    from otr_cli.train.batches import StepPlan

    trainer = typed.trainer
    plan = StepPlan(len(lengths), trainer.micro_batch_size, trainer.grad_accum * world_size, 1, seed=typed.seed,
                    shuffle=typed.data.shuffle, lengths=tuple(lengths), group_by_length=typed.data.group_by_length,
                    max_tokens_per_batch=max_tokens_per_batch)
    return [batch for step in range(plan.steps_for_epochs(1)) for batch in plan.rank_micro_batches(step, 0)]


@dataclass
class DataInspection:
    """What `otr data` shows: the report, lengths, padding per layout, steps, examples."""

    report: Any  # DataReport
    lengths: Any  # data/inspect.LengthStats
    world_size: int
    micro_batch_size: int
    grad_accum: int
    packing: bool  # data.packing as configured
    padded: Any  # data/inspect.LayoutCost over the first epoch, unpacked
    packed: Any  # LayoutCost packed, or None when model.attn_implementation cannot pack
    packed_attention: Optional[str]
    packed_row_capacity: Optional[int]
    max_tokens_per_batch: int
    steps_per_epoch: int
    total_steps: int
    examples: list[dict[str, Any]]  # {"spans": [(text, supervised)], "tokens", "supervised"}

    def as_dict(self) -> dict[str, Any]:
        from otr_cli.data.inspect import marked_text

        return {
            "report": self.report.as_dict(),
            "cache": {"state": self.report.cache, "path": self.report.cache_path},
            "lengths": self.lengths.as_dict(),
            "batches": {"world_size": self.world_size, "micro_batch_size": self.micro_batch_size,
                        "grad_accum": self.grad_accum, "packing": self.packing,
                        "max_tokens_per_batch": self.max_tokens_per_batch,
                        "steps_per_epoch": self.steps_per_epoch, "total_steps": self.total_steps},
            "padding": {"padded": self.padded.as_dict(),
                        "packed": None if self.packed is None else {
                            **self.packed.as_dict(), "attention": self.packed_attention,
                            "row_capacity": self.packed_row_capacity}},
            "examples": [{"text": marked_text(example["spans"]), "tokens": example["tokens"],
                          "supervised": example["supervised"]} for example in self.examples],
        }


def inspect_run_data(typed, options: DataOptions) -> DataInspection:
    """Tokenizer, data (through the cache, exactly as `otr train` builds it) and what they make of batches."""
    from otr_cli.data import build_datasets
    from otr_cli.data.inspect import length_stats, packed_cost, padded_cost, rendered_spans
    from otr_cli.models import load_run_tokenizer
    from otr_cli.train.batches import StepPlan

    tokenizer = load_run_tokenizer(typed.model)
    bundle = build_datasets(typed.data, tokenizer, seed=typed.seed)  # the call and key of train/loop.py
    world_size = options.ranks or default_world_size(typed)
    lengths = bundle.train.lengths.tolist()
    trainer = typed.trainer
    padded = padded_cost(epoch_micro_batches(typed, lengths, world_size, 0), lengths)
    implementation, capacity = packed_rows_for(typed)
    packed = None
    if implementation is not None:
        packed = packed_cost(epoch_micro_batches(typed, lengths, world_size, trainer.max_tokens_per_batch), lengths,
                             capacity)
    plan = StepPlan(len(lengths), trainer.micro_batch_size, trainer.grad_accum, world_size, seed=typed.seed,
                    shuffle=typed.data.shuffle, lengths=tuple(lengths), group_by_length=typed.data.group_by_length,
                    max_tokens_per_batch=trainer.max_tokens_per_batch)
    steps_per_epoch = plan.steps_for_epochs(1)
    total_steps = trainer.max_steps if trainer.max_steps > 0 else plan.steps_for_epochs(trainer.epochs)
    shown = [bundle.train[index] for index in range(min(options.examples, len(bundle.train)))]
    examples = [{"spans": rendered_spans(example, tokenizer), "tokens": len(example.input_ids),
                 "supervised": example.num_supervised} for example in shown]
    return DataInspection(bundle.report, length_stats(lengths, typed.data.max_length), world_size,
                          trainer.micro_batch_size, trainer.grad_accum, typed.data.packing, padded, packed,
                          implementation, capacity, trainer.max_tokens_per_batch, steps_per_epoch, total_steps,
                          examples)


def print_inspection(inspection: DataInspection) -> None:
    """The inspection for a person: rich styling in a terminal, ⟦marks⟧ around supervised text elsewhere."""
    from rich import box
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    from otr_cli.data.inspect import histogram_lines, marked_text

    console = Console()
    console.print(sources_line(), highlight=False, soft_wrap=True)
    console.rule("data")
    for line in inspection.report.summary_lines():
        console.print(line, highlight=False, soft_wrap=True)

    stats = inspection.lengths
    console.rule(f"token lengths ({stats.count} training examples)")
    console.print(f"min {stats.minimum}, mean {stats.mean:.1f}, median {stats.median:g}, p95 {stats.p95}, "
                  f"max {stats.maximum} (data.max_length={inspection.report.max_length})", highlight=False)
    for line in histogram_lines(stats):
        console.print(line, highlight=False)

    console.rule(f"first epoch's micro-batches (world size {inspection.world_size}, micro batch "
                 f"{inspection.micro_batch_size}, grad accum {inspection.grad_accum})")
    # Narrow enough for 80 columns, the width of a pipe or a log file.
    table = Table(box=box.SIMPLE_HEAD)
    for header in ("data.packing", "rows", "tokens", "positions", "padding", ""):
        table.add_column(header, no_wrap=True)
    this_run = "← this run"
    table.add_row("false", "one per example", str(inspection.padded.real_tokens), str(inspection.padded.positions),
                  f"{100 * inspection.padded.padding_share:.1f}%", "" if inspection.packing else this_run)
    if inspection.packed is None:
        table.add_row("true", "-", "-", "-", "-", "model.attn_implementation cannot pack")
    else:
        rows = ("one" if inspection.packed_row_capacity is None
                else f"of <= {inspection.packed_row_capacity} tokens")
        table.add_row("true", rows, str(inspection.packed.real_tokens), str(inspection.packed.positions),
                      f"{100 * inspection.packed.padding_share:.1f}%", this_run if inspection.packing else "")
    console.print(table)
    console.print("rows: per micro-batch; tokens: the examples' own; positions: what the model computes, padding "
                  "included", highlight=False, soft_wrap=True)
    budget = (f", micro-batches of up to {inspection.max_tokens_per_batch} tokens" if inspection.max_tokens_per_batch
              else "")
    console.print(f"one epoch: {inspection.steps_per_epoch} optimizer steps{budget}; this run: "
                  f"{inspection.total_steps} steps", highlight=False)

    if inspection.examples:
        console.rule(f"first {len(inspection.examples)} training examples (supervised text "
                     f"{'highlighted' if console.is_terminal else 'between ⟦ and ⟧'})")
    for number, example in enumerate(inspection.examples, start=1):
        console.print(f"example {number}: {example['tokens']} tokens, {example['supervised']} supervised",
                      style="bold", highlight=False)
        if console.is_terminal:
            text = Text()
            for span, supervised in example["spans"]:
                text.append(span, style="black on green" if supervised else None)
            console.print(text, soft_wrap=True)
        else:
            console.print(marked_text(example["spans"]), highlight=False, markup=False, soft_wrap=True)
