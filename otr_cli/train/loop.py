"""`otr train`: the training recipe (set-up, loop, validation, checkpoints, end of run).

Read top to bottom: ``run_training`` builds everything, ``Trainer.train`` is the loop.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist
from omegaconf import OmegaConf

from otr_cli.atomic import write_json_atomic, write_text_atomic
from otr_cli.config import PhaseConfig, TrainConfig, check_chat_template_kwargs, loss_options
from otr_cli.data import DataBundle, build_datasets, collate_batch, collate_packed
from otr_cli.losses.objectives import ROLLOUT_STAT_NAMES, STAT_NAMES, stat_names
from otr_cli.models import load_run_tokenizer
from otr_cli.train import preemption
from otr_cli.train.batches import StepPlan, loss_weights, padded_shard_starts
from otr_cli.train.abandoned import move_newer_branch_aside
from otr_cli.train.best_checkpoint import BestTracker, greater_is_better, record_best_in
from otr_cli.train.checkpoints import (DS_TAG, RunDirectory, RunExistsError, check_same_data_order,
                                      check_same_training_data, read_trainer_state, topology_record,
                                      verified_resume)
from otr_cli.train.data_identity import train_data_fingerprint
from otr_cli.train.distributed import DistInfo, barrier, decide_on_main, init_distributed
from otr_cli.train.checkpoint_size import estimate_for_run
from otr_cli.train.engine import TrainingEngine, build_engine
from otr_cli.train.chat_export import chat_export_for
from otr_cli.train.export import export_hf_model
from otr_cli.train.metrics import MetricsLog, plot_curves, read_metrics
from otr_cli.train.micro_batch import MicroBatch, micro_batch_to_device
from otr_cli.train.nonfinite import NonFiniteGuard
from otr_cli.train.packed_attention import packed_attention_implementation, packed_row_capacity
from otr_cli.train.progress import TrainProgress, print_summary
from otr_cli.train.random_state import (restore_rank_states, restore_rng_states, rng_states, save_rank_states,
                                         seed_everything, seed_for_rank)
from otr_cli.train.reshard import ResumePlan, prepare_resume, remove_universal_forms
from otr_cli.train.run_lock import holding_run_directory
from otr_cli.train.save_failure import save_deepspeed_state
from otr_cli.train.save_timing import timed_save
from otr_cli.train.schedule import Phase, build_schedule, phase_at, phase_boundaries
from otr_cli.train.signals import WeakSignalMonitor
from otr_cli.train.token_loss_model import sampling_generator
from otr_cli.train.trainer_state import OTR_STATE, TRAINER_STATE, otr_state, trainer_state
from otr_cli.train.trackers import open_trackers

log = logging.getLogger("otr.train")

# Order of the statistics all-reduced each step (sums; divided by `count` afterwards): every rank sends
# all of them, whatever its phase's objective, so the all-reduce has one shape.
STAT_KEYS = STAT_NAMES + ROLLOUT_STAT_NAMES


def resolve_output_dir(cfg: TrainConfig) -> Path:
    if cfg.run.output_dir:
        return Path(cfg.run.output_dir)
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN:
        return Path(HydraConfig.get().runtime.output_dir)
    return Path("outputs") / cfg.run.name


def all_reduce_sum(values: list[float] | torch.Tensor, device: torch.device) -> list[float]:
    """Element-wise sum over ranks of numbers (or of a float64 [n] tensor already on ``device``),
    read back to the host once."""
    tensor = values if torch.is_tensor(values) else torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor.tolist()


class Trainer:
    def __init__(self, cfg: TrainConfig, dist_info: DistInfo, run_dir: RunDirectory, data: DataBundle, tokenizer,
                 engine: TrainingEngine, total_steps: int, plan: StepPlan,
                 data_fingerprint: Optional[dict[str, Any]] = None):
        self.cfg = cfg
        self.dist = dist_info
        self.run_dir = run_dir
        self.data = data
        self.tokenizer = tokenizer
        # What every export saves so the model is prompted as it was trained: the template and its stop token.
        self.chat_export = chat_export_for(tokenizer, cfg.data.chat_template,
                                           check_chat_template_kwargs("data.chat_template_kwargs",
                                                                      cfg.data.chat_template_kwargs))
        self.engine = engine
        self.total_steps = total_steps
        self.plan = plan
        # What the run trains on (train/data_identity.py; rank 0's, None on the others), kept in otr_state.json.
        self.data_fingerprint = data_fingerprint
        self.phases: list[Phase] = build_schedule(cfg.loss, total_steps)
        # Step after which each phase but the last ends: {step: phase}.
        self.phase_ends = phase_boundaries(self.phases)
        # The step of the newest checkpoint this process wrote or resumed from (None: none yet).
        self.saved_at: Optional[int] = None
        self.resumed_at: Optional[int] = None
        self.step = 0
        self.device = self.engine.deepspeed.device
        self.metrics = MetricsLog(run_dir.root / "metrics.jsonl", enabled=dist_info.is_main,
                                  trackers=open_trackers(cfg, run_dir.root) if dist_info.is_main else None)
        self.pad_id = tokenizer.pad_token_id
        # Tokens per packed row (None: one row per micro-batch), set by the attention kernel.
        self.packed_row_capacity = (packed_row_capacity(cfg.data, packed_attention_implementation(engine.lm))
                                    if cfg.data.packing else None)
        # Evaluations made during training, by phase name (e.g. the end of the SFT warm-up).
        self.phase_evals: dict[str, dict] = {}
        # The longest time an evaluation on this rank went without looking for a stop signal (seconds):
        # a signal's wait before the stop-save, counted in the slow-save warning.
        self.longest_evaluation_stretch_s = 0.0
        # trainer.on_nonfinite: a step whose loss or gradient is not finite is skipped or stops the run.
        self.nonfinite = NonFiniteGuard(cfg.trainer.on_nonfinite, cfg.trainer.max_nonfinite_skips, engine,
                                        dist_info.is_main)
        # trainer.metric_for_best: the best checkpoint so far (the same on every rank), early stopping.
        trainer_cfg = cfg.trainer
        self.best = (BestTracker(trainer_cfg.metric_for_best,
                                 greater_is_better(trainer_cfg.metric_for_best, trainer_cfg.greater_is_better),
                                 trainer_cfg.early_stopping_patience, trainer_cfg.early_stopping_threshold)
                     if trainer_cfg.metric_for_best else None)
        # The scores of the periodic evaluation of the current step (rank 0; {} elsewhere or when none ran).
        self.periodic_scores: dict[str, float] = {}
        # The step at which trainer.early_stopping_patience stopped the run (None: it ran to the end).
        self.stopped_early_at: Optional[int] = None

    # -- state ---------------------------------------------------------------------------------
    def resume_from(self, checkpoint: Path, plan: Optional[ResumePlan] = None) -> None:
        """Continue from `checkpoint`; its DeepSpeed state is loaded from where `plan` says (its universal form
        when it was saved by another number of ranks), else from its ds/."""
        load_dir, tag = (plan.load_dir, plan.tag) if plan is not None else (checkpoint, DS_TAG)
        _, client_state = self.engine.deepspeed.load_checkpoint(str(load_dir), tag=tag, load_optimizer_states=True,
                                                                load_lr_scheduler_states=True)
        state = read_trainer_state(checkpoint)
        self.step = int(state["step"])
        restore_rank_states(Path(checkpoint) / DS_TAG, self.dist.rank, self.dist.world_size, self.cfg.seed, self.step,
                            single_process_states=(client_state or {}).get("rng"))
        self.metrics.truncate_after(self.step)
        self.resumed_at = self.step
        if self.best is not None:
            self._restore_best(state.get("best"))
        if Path(checkpoint).resolve() == self.run_dir.checkpoint_path(self.step).resolve():
            self.saved_at = self.step  # this run's checkpoint of this step: evaluations here use its export
        log.info("Resumed from %s at step %d", checkpoint, self.step)

    def save_checkpoint(self) -> Path:
        # Two stages, agreed on by every rank after each (RunDirectory.save_checkpoint): a rank whose write
        # failed must not enter the export's gather (ZeRO-3) while the others do.
        def write_state(tmp_dir: Path) -> None:
            save_deepspeed_state(self.engine.deepspeed, tmp_dir, DS_TAG)
            save_rank_states(tmp_dir / DS_TAG, self.dist.rank, self.dist.world_size)  # ZeRO 0-2 saves rank 0's alone

        def write_export(tmp_dir: Path) -> None:
            if self.cfg.trainer.export_every_save:
                export_hf_model(self.engine, tmp_dir, self.tokenizer, self.dist.is_main,
                                chat=self.chat_export)
            if self.dist.is_main:
                trainer_cfg = self.cfg.trainer
                best = self.best.record() if self.best is not None else None
                write_json_atomic(tmp_dir / OTR_STATE, otr_state(step=self.step, best=best, otr_fields={
                    "total_steps": self.total_steps, "global_batch": self.plan.global_batch,
                    "seed": self.cfg.seed, "max_tokens_per_batch": self.plan.max_tokens_per_batch,
                    "data_order": self.plan.order_settings(),
                    "topology": topology_record(self.dist.world_size, self.engine.zero_stage),
                    **({"data_fingerprint": self.data_fingerprint} if self.data_fingerprint else {}),
                }))
                # Written last: a checkpoint is complete once its trainer_state.json is there.
                write_json_atomic(tmp_dir / TRAINER_STATE, trainer_state(
                    step=self.step, epoch=self.plan.epoch_at(self.step), max_steps=self.total_steps,
                    num_train_epochs=trainer_cfg.epochs if trainer_cfg.max_steps <= 0 else
                    self.plan.epoch_at(self.total_steps), micro_batch_size=trainer_cfg.micro_batch_size,
                    logging_steps=trainer_cfg.log_steps, save_steps=trainer_cfg.save_steps,
                    eval_steps=trainer_cfg.eval_steps, records=self.metrics.records(),
                    best=best))

        def expected_bytes() -> int:  # for the message of a full disk only
            return estimate_for_run(self.cfg, self.device.type == "cuda", self.dist.world_size).total_bytes

        checkpoint = timed_save(
            lambda clock: self.run_dir.save_checkpoint(self.step, [write_state, write_export],
                                                       self.cfg.trainer.save_total_limit, clock.gather, expected_bytes),
            step=self.step, signal_delay_s=self.cfg.launcher.signal_delay_s, is_main=self.dist.is_main,
            write_metrics=self.metrics.write, sum_over_ranks=lambda values: all_reduce_sum(values, self.device),
            world_size=self.dist.world_size, in_background=self.run_dir.background.submit,
            evaluation_s=self.longest_evaluation_stretch_s)
        self.saved_at = self.step
        return checkpoint

    # -- the best checkpoint (trainer.metric_for_best) -------------------------------------------
    def _restore_best(self, saved: Optional[dict[str, Any]]) -> None:
        """The best record of the checkpoint resumed from; a benchmark score of its step measured after its
        save (kept in metrics.jsonl, perhaps not yet in its trainer_state.json) is observed again, on rank 0."""
        self.best.restore(saved)
        if not self.best.metric.startswith("eval/"):
            self._protect_best()
            return

        def with_own_score() -> Optional[dict[str, Any]]:
            for record in read_metrics(self.run_dir.root / "metrics.jsonl"):
                if record.get("step") == self.step and self.best.metric in record:
                    self.best.observe(self.step, float(record[self.best.metric]), self.run_dir.checkpoint_path(self.step))
            return self.best.record()

        self.best.restore(decide_on_main(with_own_score))
        self._protect_best()

    def _protect_best(self) -> None:
        """Pruning (rank 0) keeps the best checkpoint beside the newest trainer.save_total_limit."""
        self.run_dir.best_checkpoint = Path(self.best.checkpoint) if self.best.checkpoint else None

    def _observe_best(self, value: Optional[float]) -> None:
        """The metric of this step (a checkpoint step; the value as every rank has it, or rank 0's): updates
        the best on rank 0 and hands the record to every rank, which take the same early-stopping decision."""
        every = self.cfg.trainer.save_steps
        if self.best is None or not every or self.step % every:
            return
        checkpoint = self.run_dir.checkpoint_path(self.step)

        def observed() -> Optional[dict[str, Any]]:
            if value is not None:
                improved = self.best.observe(self.step, value, checkpoint)
                log.info("%s=%.6g at step %d%s", self.best.metric, value, self.step,
                         " (new best)" if improved else f" (best {self.best.metric_value:.6g} at step {self.best.step})")
            return self.best.record()

        self.best.restore(decide_on_main(observed))
        self._protect_best()
        if self.saved_at == self.step and self.dist.is_main:  # measured after the save: recorded in it now
            best = self.best.record()
            self.run_dir.background.submit(lambda: record_best_in(checkpoint, best))

    def _early_stop(self) -> bool:
        """trainer.early_stopping_patience evaluations without improvement: stop here (same on every rank)."""
        if self.best is None or not self.best.should_stop() or self.step >= self.total_steps:
            return False
        self.stopped_early_at = self.step
        message = (f"early stopping at step {self.step}: {self.best.metric} has not improved by more than "
                   f"{self.best.threshold:g} for {self.best.evaluations_without_improvement} evaluations "
                   f"(trainer.early_stopping_patience={self.best.patience}); best {self.best.metric_value:.6g} at "
                   f"step {self.best.step}")
        if self.dist.is_main:
            log.warning(message)
            self.metrics.write({"step": self.step, "early_stopping": message})
        return True

    def checkpoint_now(self) -> Path:
        """A complete checkpoint of the current step: the one just written, else a new one (same path on every rank)."""
        return self.run_dir.checkpoint_path(self.step) if self.saved_at == self.step else self.save_checkpoint()

    # -- one optimizer step --------------------------------------------------------------------
    def train_step(self) -> dict[str, Any]:
        phase = phase_at(self.phases, self.step)
        options = phase.options
        micro_indices = self.plan.rank_micro_batches(self.step, self.dist.rank)
        micro_examples = [[self.data.train[i] for i in indices] for indices in micro_indices]
        local_tokens = sum(ex.num_supervised for examples in micro_examples for ex in examples)
        local_sequences = sum(1 for examples in micro_examples for ex in examples if ex.num_supervised > 0)
        global_tokens, global_sequences = all_reduce_sum([local_tokens, local_sequences], self.device)
        lr = self.engine.deepspeed.get_lr()[0]

        # [loss, supervised count, input tokens, positions computed (input tokens + padding),
        # count-weighted statistics...], summed on the device and read once per step (after the
        # all-reduce): float(stats[...]) per micro-step would wait for the GPU every time.
        # ..., and last, ZeRO-0's gradient norm (nonfinite.py), read with the rest before the update it decides on.
        sums = torch.zeros(5 + len(STAT_KEYS), dtype=torch.float64, device=self.device)
        guard = self.nonfinite
        for micro_step, examples in enumerate(micro_examples):
            batch = micro_batch_to_device(self.collate_train(examples), self.device)
            sums[:-1] += self.forward_backward(batch, micro_step, options, (int(global_tokens), int(global_sequences)))
            if micro_step < len(micro_examples) - 1:
                self.engine.deepspeed.step()
                continue
            if guard.loop_checks_gradients:
                sums[-1] = guard.gradient_norm_on_device(self.dist.rank)
            reduced = all_reduce_sum(sums, self.device)
            grad_norm = reduced[-1] if guard.loop_checks_gradients else None
            with guard.update(loss=reduced[0], gradient_norm=grad_norm):
                self.engine.deepspeed.step()

        loss_global, count_global, tokens_global, positions_global = reduced[:4]
        self.step += 1
        outcome = guard.conclude(self.step, lambda: self.step_example_ids(self.step - 1),
                                 self.run_dir.checkpoint_path(self.saved_at) if self.saved_at is not None else None,
                                 self.metrics.write)
        record: dict[str, Any] = {
            "step": self.step,
            "epoch": round(self.plan.epoch_at(self.step), 4),
            "objective": options.objective,
            "phase": phase.index,
            "loss": loss_global,
            "lr": lr,
            "grad_norm": grad_norm if grad_norm is not None else _as_float(self.engine.deepspeed.get_global_grad_norm()),
            "tokens": int(tokens_global),
            "supervised_tokens": int(count_global),
            # Share of the positions the model computed that were padding (0 when packed into one row).
            "padding_frac": 1.0 - float(tokens_global) / max(float(positions_global), 1.0),
        }
        record.update(outcome.fields)
        reported = stat_names(options.objective)
        for key, total in zip(STAT_KEYS, reduced[4:-1]):
            if key in reported:
                record[key] = total / max(count_global, 1.0)
        return record

    def step_example_ids(self, step: int) -> list[int]:
        """Indices into the training set of every rank's micro-batches of optimizer step `step` (0-based), rank by
        rank: a function of the step (StepPlan), so no rank asks another."""
        return [index for rank in range(self.dist.world_size)
                for micro in self.plan.rank_micro_batches(step, rank) for index in micro]

    def forward_backward(self, batch: MicroBatch, micro_step: int, options, global_counts: tuple[int, int]
                         ) -> torch.Tensor:
        """Forward and backward of one micro-batch, reading nothing back from the device (what the
        model needs to know about the batch was found on the host: micro_batch.py).

        global_counts: (supervised tokens, sequences) of the global batch, host ints. Returns this
        micro-step's float64 [4 + len(STAT_KEYS)] contribution to train_step's sums, on the device.
        """
        tensors = batch.tensors
        replicas = self.cfg.trainer.grad_accum * self.dist.world_size
        weights = loss_weights(tensors, self.cfg.loss.reduction, *global_counts, replicas)
        generator = sampling_generator(self.cfg.seed, self.step, micro_step, self.dist.rank, self.device)
        loss, stats = self.engine.deepspeed(tensors["input_ids"], tensors["attention_mask"], tensors["labels"],
                                            weights, options, generator, **batch.model_kwargs())
        self.engine.deepspeed.backward(loss)
        dtype = torch.float64
        # Fills on the device from host numbers: torch.tensor(value, device=cuda) would copy from the host and wait.
        count = torch.full((), float(batch.supervised.count), dtype=dtype, device=self.device)
        positions = torch.full((), float(tensors["input_ids"].numel()), dtype=dtype, device=self.device)
        absent = torch.zeros((), dtype=dtype, device=self.device)
        return torch.stack([loss.detach().to(dtype) / replicas, count, tensors["attention_mask"].sum().to(dtype),
                            positions]
                           + [stats[key].to(dtype) * count if key in stats else absent for key in STAT_KEYS])

    def collate_train(self, examples) -> dict[str, torch.Tensor]:
        """A training micro-batch: packed rows with data.packing (data/packing.py), else padded rows."""
        if self.cfg.data.packing:
            return collate_packed(examples, self.pad_id, self.packed_row_capacity)
        return collate_batch(examples, self.pad_id)

    def evaluate_current_model(self, eval_cfg, out_dir: Path) -> dict[str, Any]:
        """The benchmarks on the model of the current step, shared out over every rank.

        Each rank generates and grades its share of the problems (eval/sharding.py) with a model
        of its own, so no rank waits in a collective while others generate: under ZeRO 0-2 the
        model in memory (every rank holds all of it), under ZeRO-3 a copy loaded from this step's
        checkpoint export when one was just written, else from a temporary consolidated export
        (the parameters are partitioned; removed afterwards). Rank 0 returns the scores, the
        others {}. Random generator states are put back afterwards, so a run that evaluates
        trains exactly like one that does not.
        """
        import shutil

        from otr_cli.eval.runner import EvaluationStopped, StopCheck, evaluate_model

        # Before the export below (a collective, minutes under ZeRO-3): a signal that came during the step
        # or the save stops the run now rather than after the evaluation.
        if preemption.stop_requested(self.device):
            raise EvaluationStopped(f"stop requested before the evaluation in {out_dir}")
        stop = StopCheck(received=preemption.stop_received, agreed=lambda: preemption.stop_requested(self.device))
        states = rng_states()
        # Decided from the step and the config every rank agrees on, not from a listing NFS may show stale.
        has_export = self.saved_at == self.step and self.cfg.trainer.export_every_save
        model_dir = self.run_dir.checkpoint_path(self.step) if has_export else None
        temporary = None
        model = None
        # vLLM loads a model from files in its own process: it gets this step's export, never a
        # name for the model in memory (which resolve_source would take for a hub id).
        if self.engine.zero_stage == 3 or eval_cfg.backend == "vllm":
            if model_dir is None:
                temporary = model_dir = out_dir / "model"
                export_hf_model(self.engine, temporary, self.tokenizer, self.dist.is_main,
                                chat=self.chat_export)  # a collective
                barrier()  # rank 0 has written it
            if eval_cfg.backend == "vllm":
                release_memory()  # hand the trainer's cached, unused GPU blocks to the vLLM process
        else:
            model = self.engine.lm
            model.eval()
        # A checkpoint's export names the model (its files fingerprint the generation cache); the model
        # in memory of a step without one gets a name of its own.
        label = str(model_dir) if model_dir is not None else f"{self.run_dir.root}@step-{self.step}"
        stopped: Optional[EvaluationStopped] = None
        try:
            model_cfg = self.cfg.model if model is not None else exported_model_cfg(self.cfg.model, label)
            result = evaluate_model(label, eval_cfg, self.cfg.data, out_dir, tokenizer=self.tokenizer,
                                    model_cfg=model_cfg, model=model, shard=self.eval_shard(), stop=stop)
        except EvaluationStopped as raised:
            stopped = raised  # raised on every rank at the same point, so the barrier below is reached by all
        finally:
            if model is not None:
                model.train()
            self.longest_evaluation_stretch_s = max(self.longest_evaluation_stretch_s, stop.longest_s)
        barrier()  # every rank is done with the temporary export
        if temporary is not None and self.dist.is_main:
            shutil.rmtree(temporary, ignore_errors=True)
        restore_rng_states(states)  # also on a stop: the checkpoint saved next keeps the training's states
        if stopped is not None:
            raise stopped
        return result

    def eval_shard(self):
        from otr_cli.eval.sharding import EvalShard

        return EvalShard(self.dist.rank, self.dist.world_size, barrier)

    # -- validation ----------------------------------------------------------------------------
    @torch.no_grad()
    def validation_ce(self) -> Optional[float]:
        """Mean cross-entropy per supervised token over the validation set (all ranks share it).

        Every rank runs the same number of forward passes: under ZeRO-3 each one is a collective
        (parameter all-gathers), so a rank with one batch more would wait forever. Ranks without a
        batch of their own in the last round run a filler batch whose loss is not counted.
        """
        examples = self.data.validation
        if not examples:
            return None
        self.engine.deepspeed.eval()
        options = loss_options(self.cfg.loss, PhaseConfig(objective="sft"))
        size = self.cfg.trainer.micro_batch_size
        ce_sum, count = 0.0, 0.0
        for start in padded_shard_starts(len(examples), size, self.dist.rank, self.dist.world_size):
            filler = start is None
            chunk = examples[0:size] if filler else examples[start:start + size]
            batch = {k: v.to(self.device) for k, v in collate_batch(chunk, self.pad_id).items()}
            weights = loss_weights(batch, "token", 1, 1, 1)
            _, stats = self.engine.deepspeed(batch["input_ids"], batch["attention_mask"], batch["labels"], weights, options)
            if not filler:
                ce_sum += float(stats["ce"]) * float(stats["count"])
                count += float(stats["count"])
        self.engine.deepspeed.train()
        ce_total, count_total = all_reduce_sum([ce_sum, count], self.device)
        return ce_total / max(count_total, 1.0)

    # -- the loop ------------------------------------------------------------------------------
    def train(self) -> list[dict[str, Any]]:
        """Steps until total_steps, then the final checkpoint, validation and final/; returns the metrics."""
        self.engine.deepspeed.train()
        progress = TrainProgress(self.total_steps, self.step, enabled=self.dist.is_main and self.cfg.trainer.progress)
        signal_monitor = WeakSignalMonitor.from_config(self.cfg.loss)
        with progress:
            self._finish_interrupted_evaluation(progress)
            # A resumed run whose record already says stop (killed between the decision and the end) stops here.
            stopped_early = self.resumed_at is not None and self._early_stop()
            while self.step < self.total_steps and not stopped_early:
                record = self._timed_step()
                self._maybe_validate(record)
                if self.best is not None and self.best.metric == "val_ce":
                    self._observe_best(record.get("val_ce"))  # before the save: its trainer_state.json has it
                self._log(record, progress, signal_monitor)
                self._maybe_save()
                self.periodic_scores = {}
                self._maybe_evaluate(progress)
                if self.best is not None and self.best.metric.startswith("eval/") and self._evaluated_now():
                    self._observe_best(self.periodic_scores.get(self.best.metric))
                self._maybe_stop()
                if self._early_stop():
                    break
        return self._finish()

    def _timed_step(self) -> dict[str, Any]:
        started = time.perf_counter()
        preemption.note_step(self.step + 1)  # a Ctrl-C now says which step it saves at the end of
        record = self.train_step()
        record["step_time_s"] = time.perf_counter() - started
        record["tokens_per_s"] = record["tokens"] / max(record["step_time_s"], 1e-9)
        return record

    def _maybe_validate(self, record: dict[str, Any]) -> None:
        """trainer.eval_steps: validation CE every N steps (every rank takes part)."""
        every = self.cfg.trainer.eval_steps
        if every and self.step % every == 0:
            val = self.validation_ce()
            if val is not None:
                record["val_ce"] = val

    def _log(self, record: dict[str, Any], progress: TrainProgress, signal_monitor: WeakSignalMonitor) -> None:
        if self.step % self.cfg.trainer.log_steps == 0 or self.step == self.total_steps:
            self.metrics.write(record)
        progress.update(record)
        if self.dist.is_main:
            warning = signal_monitor.observe(record)
            if warning:
                log.warning(warning)
                self.metrics.write({"step": self.step, "warning": warning})

    def _maybe_save(self) -> None:
        every = self.cfg.trainer.save_steps
        if every and self.step % every == 0:
            self.save_checkpoint()

    def _maybe_evaluate(self, progress: TrainProgress, periodic_only: bool = False) -> None:
        """Benchmarks at phase ends (eval.after_warmup, on a checkpoint of that step) and every
        eval.every_steps (on eval.every_steps_limit problems), both through evaluate_current_model.
        A stop request before or during one skips the rest: the caller's _maybe_stop saves and leaves."""
        from otr_cli.eval.runner import EvaluationStopped

        try:
            self._evaluate_due(progress, periodic_only)
        except EvaluationStopped as stopped:
            log.info("%s: stopping", stopped)

    def _evaluate_due(self, progress: TrainProgress, periodic_only: bool) -> None:
        eval_cfg = self.cfg.eval
        if not eval_cfg.benchmarks:
            return
        ending = self.phase_ends.get(self.step) if eval_cfg.after_warmup and not periodic_only else None
        if ending is not None:
            self.checkpoint_now()  # phase ends are kept: a later run can start from them
            objective = ending.options.objective
            name = ("after SFT warm-up" if objective == "sft" and ending.index == 0
                    else f"after phase {ending.index + 1}, {objective}")
            out_dir = self.run_dir.root / "eval" / f"phase-{ending.index + 1}"
            self.phase_evals[f"{name} (step {self.step})"] = self.evaluate_current_model(eval_cfg, out_dir)
        every = eval_cfg.every_steps
        if every > 0 and self.step % every == 0 and self.step < self.total_steps:
            import dataclasses

            subset = dataclasses.replace(eval_cfg, limit=min(eval_cfg.limit or 10**9, eval_cfg.every_steps_limit))
            scores = self.evaluate_current_model(subset, self.run_dir.root / "eval" / f"step-{self.step}")
            if self.dist.is_main:
                self.periodic_scores = {f"eval/{name}": r["value"] for name, r in scores.items()}
                self.metrics.write({"step": self.step, **self.periodic_scores})
                progress.note("eval at step %d: %s" % (self.step, ", ".join(
                    f"{name} {r['value']:.1%}" for name, r in scores.items())))

    def _evaluated_now(self) -> bool:
        """Whether this step had a periodic evaluation (from the step and the config, the same on every rank)."""
        every = self.cfg.eval.every_steps
        return bool(self.cfg.eval.benchmarks) and every > 0 and self.step % every == 0 and self.step < self.total_steps

    def _finish_interrupted_evaluation(self, progress: TrainProgress) -> None:
        """A run stopped between a checkpoint and the end of the periodic evaluation that follows it
        (killed, preempted) resumes at that step without its score: evaluate it now. The generation
        cache in eval/step-N holds what was generated before the stop."""
        every = self.cfg.eval.every_steps
        if (self.resumed_at is None or not self.cfg.eval.benchmarks or every <= 0 or self.step % every
                or self.step >= self.total_steps):
            return
        missing = 0.0
        if self.dist.is_main:
            records = read_metrics(self.run_dir.root / "metrics.jsonl")
            missing = float(not any(r.get("step") == self.step and any(k.startswith("eval/") for k in r)
                                    for r in records))
        if all_reduce_sum([missing], self.device)[0] > 0:  # rank 0 read the file; every rank must agree
            log.info("Resumed at step %d without its evaluation (eval.every_steps=%d): evaluating now", self.step, every)
            self.periodic_scores = {}
            self._maybe_evaluate(progress, periodic_only=True)
            if self.best is not None and self.best.metric.startswith("eval/"):
                self._observe_best(self.periodic_scores.get(self.best.metric))  # the score the stop cut off
            self._maybe_stop()  # a stop during it: save and leave before another step

    def _maybe_stop(self) -> None:
        """A stop signal on any rank: all save at this step boundary and leave (preemption.py)."""
        if preemption.stop_requested(self.device):
            last = self.checkpoint_now()
            self.run_dir.mark("preempted", step=self.step, total_steps=self.total_steps)
            self.metrics.close()
            raise preemption.Preempted(self.step, last)

    def _finish(self) -> list[dict[str, Any]]:
        last = self.checkpoint_now()
        records = read_metrics(self.run_dir.root / "metrics.jsonl") if self.dist.is_main else []
        val = self.validation_ce()
        if val is not None and self.dist.is_main:
            final_record = {"step": self.step, "val_ce": val}
            self.metrics.write(final_record)
            records.append(final_record)
        # Without an export in the checkpoint, final/ gets one of its own (a collective).
        export = None if self.cfg.trainer.export_every_save else (
            lambda target: export_hf_model(self.engine, target, self.tokenizer, self.dist.is_main,
                                           chat=self.chat_export))
        source = last
        if self.cfg.trainer.final_model == "best" and self.best is not None and self.best.checkpoint:
            source = Path(self.best.checkpoint)  # never pruned; the same path on every rank
            if self.dist.is_main:
                log.info("final/ holds the best checkpoint, %s (%s=%.6g)", source.name, self.best.metric,
                         self.best.metric_value)
        self.run_dir.publish_final(source, export)
        self.metrics.close()
        return records


def exported_model_cfg(model_cfg, directory: str):
    """How to load a model otr exported (safetensors in `directory`): the base model's dtype and attention,
    none of its GGUF file, revision or separate tokenizer."""
    import dataclasses

    return dataclasses.replace(model_cfg, name_or_path=directory, gguf_file=None, revision=None, tokenizer=None)


def release_memory() -> None:
    """Collect what the deleted engine held (its ZeRO hooks form reference cycles) and return the
    cached GPU blocks, so the evaluation copy of the model finds the memory free."""
    import gc

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def check_vllm_fits_beside_trainer(cfg: TrainConfig, model, device: torch.device,
                                   memory: Optional[Callable[[], Optional[tuple[int, int]]]] = None) -> None:
    """At the start of a run whose evaluations during training use vLLM (eval.every_steps or
    eval.after_warmup): is enough GPU memory free beside the trainer's resident state (weights, ZeRO
    partitions, optimizer states) for the vLLM child that the first evaluation starts? Hours later is
    too late to learn it. Every rank measures its own GPU (after returning the allocator's cache) and
    the verdict is all-reduced, so every rank raises the same ConfigError or none does.
    `memory`: (free, total) bytes of this rank's GPU (tests fake it); None without CUDA.
    """
    from otr_cli.config import ConfigError
    from otr_cli.eval.generation import gpu_free_memory, vllm_memory_fraction
    from otr_cli.eval.runner import vllm_dtype

    eval_cfg = cfg.eval
    if eval_cfg.backend != "vllm" or not eval_cfg.benchmarks or not (eval_cfg.every_steps > 0 or eval_cfg.after_warmup):
        return
    if memory is None:
        if device.type != "cuda":
            return  # vLLM's CPU build sizes its KV cache from VLLM_CPU_KVCACHE_SPACE
        release_memory()
        memory = lambda: gpu_free_memory(device.index)  # noqa: E731
    measured = memory()
    if measured is None:
        return
    free, total = measured
    bytes_per_parameter = 4 if vllm_dtype(eval_cfg, cfg.model, cuda=True) == "float32" else 2
    parameters = sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters())
    weights = parameters * bytes_per_parameter // max(1, eval_cfg.vllm.tensor_parallel_size)
    verdict = ""
    try:
        fraction = vllm_memory_fraction(free, total, weights, eval_cfg.vllm.gpu_memory_utilization,
                                        device=f"GPU {device.index if device.index is not None else 0}")
        log.info("vLLM beside the trainer: %.1f of %.1f GiB free, gpu_memory_utilization %.3f",
                 free / 2**30, total / 2**30, fraction)
    except ConfigError as err:
        verdict = str(err)
    failed = all_reduce_sum([1.0 if verdict else 0.0], device)[0]
    if failed:
        raise ConfigError(verdict or f"eval.vllm.gpu_memory_utilization: {int(failed)} other rank(s) have too little "
                                     f"GPU memory free for vLLM beside the trainer (their logs say how much)")


def _as_float(value) -> Optional[float]:
    if value is None:
        return None
    return float(value.item() if torch.is_tensor(value) else value)


def check_output_dir(run_dir: RunDirectory, cfg: TrainConfig) -> None:
    """Refuse to silently overwrite a finished run or restart over unfinished checkpoints."""
    if cfg.trainer.overwrite:
        return
    if run_dir.is_finished():
        raise RunExistsError(
            f"{run_dir.root} holds a finished run (see {run_dir.state_file}). Choose another run.output_dir, "
            f"or pass trainer.overwrite=true to delete its checkpoints and final model and train again.")
    if cfg.trainer.resume == "never" and run_dir.has_previous_run():
        raise RunExistsError(
            f"{run_dir.root} holds checkpoints of an unfinished run and trainer.resume=never. Use "
            f"trainer.resume=auto to continue it, or trainer.overwrite=true to start again from scratch.")


def run_training(cfg: TrainConfig) -> dict[str, Any]:
    """Everything `otr train` does after the config is validated. Returns the run summary."""
    dist_info = init_distributed(cfg.launcher.dist_timeout_min)
    output_dir = resolve_output_dir(cfg)
    # One `otr train` per directory, decided before anything is written: a second one is refused on every rank.
    with holding_run_directory(output_dir, cfg.run.lock_stale_min * 60, dist_info.is_main):
        return _train_in(cfg, dist_info, output_dir)


def _train_in(cfg: TrainConfig, dist_info: DistInfo, output_dir: Path) -> dict[str, Any]:
    """run_training in its locked output directory."""
    run_dir = RunDirectory(output_dir, dist_info)
    decide_on_main(lambda: check_output_dir(run_dir, cfg))  # one verdict from one listing, raised on every rank
    run_dir.prepare(overwrite=cfg.trainer.overwrite)
    seed_everything(cfg.seed)

    tokenizer = load_run_tokenizer(cfg.model)
    data = _build_data_once(cfg, tokenizer, dist_info)

    plan = StepPlan(len(data.train), cfg.trainer.micro_batch_size, cfg.trainer.grad_accum, dist_info.world_size,
                    seed=cfg.seed, shuffle=cfg.data.shuffle,
                    lengths=tuple(data.train.lengths.tolist()),
                    group_by_length=cfg.data.group_by_length, max_tokens_per_batch=cfg.trainer.max_tokens_per_batch)
    total_steps = cfg.trainer.max_steps if cfg.trainer.max_steps > 0 else plan.steps_for_epochs(cfg.trainer.epochs)

    # Rank 0's listing decides for every rank: NFS can show another rank an older checkpoints/ (and a rank
    # resuming alone from another step would enter other collectives than the rest).
    checkpoint = verified_resume(run_dir, cfg.trainer.resume)  # damaged ones set aside (auto) or refused
    fingerprint = train_data_fingerprint(data.train, cfg.data) if dist_info.is_main else None
    resume_plan = None
    data_change = None
    if checkpoint is not None:  # before the model loads: a resume that would change the batches is refused now
        data_change = decide_on_main(lambda: check_same_training_data(checkpoint, fingerprint,
                                                                      cfg.trainer.resume_with_changed_data))
        check_same_data_order(checkpoint, plan.order_settings())
        # Also before: a resume DeepSpeed cannot load at this world size is refused, one it can is converted.
        resume_plan = prepare_resume(checkpoint, dist_info.world_size, cfg.deepspeed.zero_stage, dist_info)
        if cfg.trainer.resume not in ("auto", "never"):  # an explicit, maybe older, checkpoint of this run
            decide_on_main(lambda: move_newer_branch_aside(run_dir, checkpoint,
                                                           int(read_trainer_state(checkpoint)["step"])))
    if dist_info.is_main:  # after that check, so that a refused resume leaves the run's files as they were
        write_text_atomic(output_dir / "config.yaml", OmegaConf.to_yaml(OmegaConf.structured(cfg)))
        write_json_atomic(output_dir / "data_report.json", data.report.as_dict())

    before = None
    if cfg.eval.benchmarks and cfg.eval.before_training:
        before = _evaluate(cfg, cfg.model.name_or_path, output_dir / "eval" / "before", dist_info, tokenizer)

    engine = build_engine(cfg, total_steps=total_steps, world_size=dist_info.world_size,
                          load_universal=resume_plan is not None and resume_plan.universal)
    if dist_info.is_main:
        log.info("%s", engine.precision.describe())
    trainer = Trainer(cfg, dist_info, run_dir, data, tokenizer, engine, total_steps, plan, data_fingerprint=fingerprint)
    # Seeded alike up to here (the initial weights); from here on each rank's dropout draws its own masks.
    seed_for_rank(cfg.seed, dist_info.rank)
    if checkpoint is not None:
        trainer.resume_from(checkpoint, resume_plan)
    # The trainer's state is all resident now: would the first evaluation's vLLM fit beside it?
    check_vllm_fits_beside_trainer(cfg, engine.lm, trainer.device)
    if data_change is not None and dist_info.is_main:
        warning = f"resumed with trainer.resume_with_changed_data=true: {data_change}"
        log.warning(warning)
        trainer.metrics.write({"step": trainer.step, "warning": warning, "resumed_with_changed_data": True})
    run_dir.mark("running", step=trainer.step, total_steps=total_steps)
    started = time.time()
    records = trainer.train()
    elapsed = time.time() - started
    if resume_plan is not None and resume_plan.universal and dist_info.is_main:
        remove_universal_forms(run_dir.checkpoints, keep=None)  # the run has saved its own checkpoints since
    evals: dict[str, dict] = {"before training": before} if before else {}
    evals.update(trainer.phase_evals)
    final_step, stopped_early_at = trainer.step, trainer.stopped_early_at
    # From metrics.jsonl rather than the trainer, so evaluations made before a resume count too.
    periodic = {r["step"]: {k[len("eval/"):]: v for k, v in r.items() if k.startswith("eval/")}
                for r in records if any(k.startswith("eval/") for k in r)}
    # Free the engine's memory before every rank loads the final model to generate with it.
    del trainer, engine
    release_memory()
    if cfg.eval.benchmarks:
        evals[f"final (step {final_step})"] = _evaluate(cfg, str(run_dir.final), output_dir / "eval" / "final",
                                                        dist_info, tokenizer)
    summary = {"output_dir": str(output_dir), "final_model": str(run_dir.final), "total_steps": total_steps,
               "train_seconds": elapsed, "eval": evals, "data": data.report.as_dict()}
    if periodic:
        summary["eval_during_training"] = periodic
    if stopped_early_at is not None:
        summary["stopped_early_at_step"] = stopped_early_at
    warnings = [r["warning"] for r in records if "warning" in r]
    if warnings:
        summary["warnings"] = warnings
    if dist_info.is_main:
        write_json_atomic(output_dir / "summary.json", summary)
        plot_curves(records, output_dir / "curves.png")
        print_summary(records, summary)
    run_dir.mark("finished", step=final_step, total_steps=total_steps)
    barrier()
    return summary


def _build_data_once(cfg: TrainConfig, tokenizer, dist_info: DistInfo) -> DataBundle:
    """build_datasets on every rank, tokenizing once (data/shared_encoding.py): rank 0 finds the cache entry,
    on a miss every rank encodes a share in short rounds, and every rank memory-maps the stored entry.

    The waits on rank 0's solo work (reading and hashing the records, merging the chunks) happen in a gloo
    group of their own whose timeout is launcher.data_timeout_min, so a data set larger than the training
    collectives' timeout allows (launcher.dist_timeout_min) still starts.
    """
    from otr_cli.data.shared_encoding import data_ranks

    ranks = data_ranks(cfg.launcher.data_timeout_min) if dist_info.world_size > 1 else None
    return build_datasets(cfg.data, tokenizer, seed=cfg.seed, **({"ranks": ranks} if ranks else {}))


def _evaluate(cfg: TrainConfig, model: str, out_dir: Path, dist_info: DistInfo, tokenizer) -> Optional[dict]:
    """Benchmarks of a saved model, shared out over every rank (each loads its own copy); the scores on
    rank 0, {} on the others.

    A resumed run calls this again for its starting model: evaluate_model's generation cache in
    `out_dir` answers without loading the model.
    """
    from otr_cli.eval.runner import evaluate_model
    from otr_cli.eval.sharding import EvalShard

    model_cfg = cfg.model if model == cfg.model.name_or_path else exported_model_cfg(cfg.model, model)
    result = evaluate_model(model, cfg.eval, cfg.data, out_dir, tokenizer=tokenizer, model_cfg=model_cfg,
                            shard=EvalShard(dist_info.rank, dist_info.world_size, barrier))
    barrier()
    return result
