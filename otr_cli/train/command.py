"""`otr train`: the Hydra task that validates the config, then dry-runs or trains (wired in otr_cli/cli.py)."""

from __future__ import annotations

import json
import os
import signal
import sys
from typing import Optional

from otr_cli.app import configure_logging, register_resolvers, run_hydra, sources_line
from otr_cli.errors import UserError, fail

# train.yaml's run.name uses ${otr.run_name:...}: a SLURM job that unpickles train_task resolves it too.
register_resolvers()


def train_entry(args: list[str]) -> int:
    """`otr train [recipe.yaml] [overrides]`."""
    return run_hydra(train_task, "train", "train", args)


def check_train_config(cfg):
    """Every start-up check of a composed `otr train` config; returns the typed TrainConfig.

    The evaluation settings are checked here too, not at the first evaluation after hours of training.
    Raises ConfigError (a UserError) naming the key.
    """
    from otr_cli.config import validate
    from otr_cli.eval.runner import check_eval_config

    typed = validate(cfg)
    check_eval_config(typed.eval)
    if typed.eval.backend == "vllm" and typed.eval.benchmarks:
        from otr_cli.eval.generation import check_vllm_placement, ranks_per_node

        check_vllm_placement(typed.eval.vllm.tensor_parallel_size, ranks_per_node())
    return typed


def train_task(cfg) -> Optional[dict]:
    """Body of `otr train` (called by Hydra with the composed config)."""
    from omegaconf import OmegaConf

    try:
        typed = check_train_config(cfg)
        if typed.dry_run:
            print_dry_run(typed, OmegaConf.to_yaml(cfg))
            return None
        return _train(typed)
    except UserError as err:
        if os.environ.get("SUBMITIT_EXECUTOR"):
            raise  # a sweep point on SLURM: Hydra hands the error back to the submitting `otr train -m`
        fail(str(err))


def _train(typed) -> dict:
    """A training run that stops cleanly on preemption signals and takes every rank down on an error."""
    from otr_cli.process_groups import end_process_groups
    from otr_cli.train import faults, preemption
    from otr_cli.train.distributed import populate_env_from_launcher
    from otr_cli.train.loop import resolve_output_dir, run_training

    populate_env_from_launcher()  # first: under srun the rank comes from SLURM, and log lines name it
    configure_logging()
    run_state = resolve_output_dir(typed) / "run_state.json"
    try:  # around watching(): a second Ctrl-C may come while its handlers are being put back
        with preemption.watching():
            try:
                with faults.stop_all_ranks_on_error(run_state, (UserError,)):
                    summary = run_training(typed)
                end_process_groups()  # outside: the run is finished and recorded whatever happens here
                return summary
            except preemption.Preempted as stop:
                # Still inside watching(): requeuing makes SLURM send this job a SIGTERM, which must not kill it
                # before it has said what it did.
                status = preemption.after_preemption(stop, int(os.environ["RANK"]), typed.launcher.max_requeues)
                end_process_groups()  # after rank 0's requeue: the other ranks wait for it here
    except KeyboardInterrupt:
        stopped_at_once(run_state)
    if preemption.stopped_on_ctrl_c():
        # Saved and about to exit: a Ctrl-C now (during the interpreter's shutdown, or a background deletion of old
        # checkpoints it waits for) leaves at once and quietly, instead of Python's traceback from wherever it is.
        signal.signal(signal.SIGINT, lambda signum, frame: os._exit(preemption.INTERRUPTED_EXIT))
    sys.exit(status)


def stopped_at_once(run_state) -> None:
    """A second Ctrl-C: one line, no traceback, exit 130 (preemption.py). Published checkpoints are complete.

    Rank 0 marks the run `preempted` at its newest complete checkpoint, which is where the same command
    resumes. Several ranks leave with os._exit: a normal exit could wait on background threads or a collective.
    """
    from otr_cli.atomic import write_json_atomic
    from otr_cli.train import preemption

    from otr_cli.train.checkpoints import complete_checkpoints_in

    found = complete_checkpoints_in(run_state.parent / "checkpoints")
    steps = [step for step, _ in found]
    newest = f"the newest complete checkpoint is {found[-1][1]}" if found else "no checkpoint was published"
    if os.environ.get("RANK", "0") == "0":
        try:
            state = json.loads(run_state.read_text())
            if state.get("status") == "running":
                write_json_atomic(run_state, {**state, "status": "preempted", "step": steps[-1] if steps else 0})
        except (OSError, ValueError):
            pass  # no state yet (stopped before training began), or unreadable: the message below still stands
        sys.stderr.write(f"stopped at once on a second Ctrl-C; {newest} (a checkpoint being written is never "
                         "published); run the same command again to resume (trainer.resume=auto)\n")
    sys.stderr.flush()
    sys.stdout.flush()
    if os.environ.get("WORLD_SIZE", "1") != "1":
        os._exit(preemption.INTERRUPTED_EXIT)
    sys.exit(preemption.INTERRUPTED_EXIT)


def print_dry_run(typed, resolved_yaml: str) -> None:
    """Config, DeepSpeed JSON and batch arithmetic, without touching weights or data."""
    import torch
    from rich.console import Console
    from rich.syntax import Syntax

    from otr_cli.train.distributed import world_size_from_env
    from otr_cli.train.ds_config import BatchArithmetic, build_deepspeed_config
    from otr_cli.train.precision import precision_for

    console = Console()
    world_size = world_size_from_env()
    on_gpu = torch.cuda.is_available()
    precision = precision_for(typed, on_gpu)
    console.print(sources_line(), highlight=False, soft_wrap=True)
    console.rule("resolved config")
    console.print(Syntax(resolved_yaml, "yaml", theme="ansi_dark"))
    console.rule(f"DeepSpeed config (world size {world_size}, {'GPU' if on_gpu else 'CPU'})")
    console.print(f"{precision.describe()} (on this machine)", highlight=False, soft_wrap=True)
    console.print_json(json.dumps(build_deepspeed_config(typed, world_size=world_size, on_gpu=on_gpu,
                                                         precision=precision.precision)))
    console.rule("batch")
    arithmetic = BatchArithmetic(typed.trainer.micro_batch_size, typed.trainer.grad_accum, world_size,
                                 typed.trainer.max_tokens_per_batch)
    console.print(arithmetic.describe(), highlight=False)
    steps = (f"{typed.trainer.max_steps} optimizer steps" if typed.trainer.max_steps > 0
             else f"{typed.trainer.epochs} epoch(s); steps are derived from the data size at start-up")
    console.print(f"training length: {steps}", highlight=False)
    print_checkpoint_estimate(console, typed, on_gpu, world_size)
    console.print("dry run: nothing was loaded or written.", highlight=False)


def print_checkpoint_estimate(console, typed, on_gpu: bool, world_size: int) -> None:
    """The size of one checkpoint, from the model's config.json (no weights); a run on GPUs if the launcher asks for them."""
    from otr_cli.train.checkpoint_size import describe_estimate, estimate_for_run

    gpu_run = on_gpu or bool(typed.launcher.gpus_per_node)
    if typed.launcher.name == "slurm" and "WORLD_SIZE" not in os.environ:
        world_size = typed.launcher.nodes * typed.launcher.tasks_per_node
    console.rule(f"checkpoint size (world size {world_size}, ZeRO-{typed.deepspeed.zero_stage}, "
                 f"{'GPU' if gpu_run else 'CPU'})")
    try:
        estimate = estimate_for_run(typed, gpu_run, world_size)
    except Exception as err:  # a hub id offline, a config transformers cannot read: the rest of the dry run stands
        console.print(f"not estimated: {type(err).__name__}: {err}", highlight=False, soft_wrap=True)
        return
    for line in describe_estimate(estimate, typed.trainer.save_total_limit):
        console.print(line, highlight=False, soft_wrap=True)
    half = typed.launcher.signal_delay_s / 2
    console.print(f"saving must finish within half of launcher.signal_delay_s ({half:g} s) to be safe before a time "
                  f"limit; each save's time is logged (docs/checkpoints.md).", highlight=False, soft_wrap=True)
