"""trainer.on_nonfinite: a step whose loss or gradient is NaN skips its update (weights and optimizer state
unchanged) or stops the run, the same on every rank; too large a learning rate is refused up front."""

from __future__ import annotations

import json

import pytest
import torch

from helpers import REPO, read_jsonl, tiny_overrides
from ranks import start_ranks, wait_all
from otr_cli.cli import main

INJECTION = str(REPO / "tests" / "nonfinite_injection.py")


def inject(monkeypatch, kind: str, steps: str, rank: int = 0, micro: int = 0) -> None:
    """A NaN loss ("loss") or NaN gradients with a finite loss ("grad") in one micro-batch of `steps`."""
    import nonfinite_injection

    for name, value in {"OTR_NONFINITE": kind, "OTR_NONFINITE_STEPS": steps, "OTR_NONFINITE_RANK": str(rank),
                        "OTR_NONFINITE_MICRO": str(micro)}.items():
        monkeypatch.setenv(name, value)
    nonfinite_injection.install(monkeypatch.setattr)


def state_tensors(checkpoint) -> dict[str, torch.Tensor]:
    """Every tensor DeepSpeed saved in a checkpoint (weights, fp32 partitions, Adam moments and steps), by
    file and key path; the random generator states (which move on every step) left out."""
    found: dict[str, torch.Tensor] = {}

    def walk(prefix: str, value) -> None:
        if torch.is_tensor(value):
            found[prefix] = value
        elif isinstance(value, dict):
            for key, item in value.items():
                walk(f"{prefix}/{key}", item)
        elif isinstance(value, (list, tuple)):
            for index, item in enumerate(value):
                walk(f"{prefix}/{index}", item)

    for path in sorted((checkpoint / "ds").rglob("*.pt")):
        if "rng" in path.name:
            continue
        walk(path.name, torch.load(path, map_location="cpu", weights_only=False))
    return found


def assert_same_state(before, after) -> None:
    first, second = state_tensors(before), state_tensors(after)
    assert first.keys() == second.keys() and first
    changed = [key for key in first if not torch.equal(first[key], second[key])]
    assert not changed, changed


def assert_finite_state(checkpoint) -> None:
    bad = [key for key, t in state_tensors(checkpoint).items() if t.is_floating_point() and not t.isfinite().all()]
    assert not bad, bad


def expected_example_ids(out, step: int, world: int) -> list[int]:
    """The training-set indices of every rank's micro-batches of `step` (1-based), rank by rank, from the run's
    own data size and settings."""
    from omegaconf import OmegaConf

    from otr_cli.train.batches import StepPlan

    cfg = OmegaConf.load(out / "config.yaml")
    kept = json.loads((out / "data_report.json").read_text())["kept"]
    plan = StepPlan(kept, cfg.trainer.micro_batch_size, cfg.trainer.grad_accum, world, seed=cfg.seed,
                    shuffle=cfg.data.shuffle)
    return [i for rank in range(world) for micro in plan.rank_micro_batches(step - 1, rank) for i in micro]


def flat(path) -> str:
    return " ".join(path.read_text().split())  # rich wraps log lines


def squeezed(text: str) -> str:
    """`text` without white space: rich wraps a long path in the middle of a word."""
    return "".join(text.split())


SAVE_EVERY_STEP = ["loss=sft", "trainer.save_steps=1", "trainer.save_total_limit=null",
                   "trainer.export_every_save=false"]


@pytest.mark.slow
@pytest.mark.faults
def test_a_nan_loss_step_is_skipped_leaving_weights_and_optimizer_state_unchanged(tiny_model_dir, tmp_path,
                                                                                  monkeypatch):
    out = tmp_path / "run"
    inject(monkeypatch, "loss", "2")
    main(["train", *tiny_overrides(tiny_model_dir, out, *SAVE_EVERY_STEP, "trainer.max_steps=4",
                                   "optim.scheduler=linear", "optim.warmup_steps=0", "optim.min_lr_ratio=0")])
    checkpoints = out / "checkpoints"
    assert any("exp_avg" in key for key in state_tensors(checkpoints / "checkpoint-1"))  # the optimizer state is compared
    assert_same_state(checkpoints / "checkpoint-1", checkpoints / "checkpoint-2")
    for step in (3, 4):
        assert_finite_state(checkpoints / f"checkpoint-{step}")
    assert_finite_state(out / "checkpoints" / "checkpoint-4")
    records = read_jsonl(out / "metrics.jsonl")
    steps = {r["step"]: r for r in records if "loss" in r}
    assert steps[2]["skipped"] is True and steps[2]["nonfinite"] == "loss"
    assert all(steps[s]["loss"] == pytest.approx(steps[s]["loss"]) and "skipped" not in steps[s] for s in (1, 3, 4))
    # The schedule follows the step counter: a linear decay over 4 steps, skipped step or not.
    assert [steps[s]["lr"] for s in (1, 2, 3, 4)] == pytest.approx([1e-3, 0.75e-3, 0.5e-3, 0.25e-3])
    skip = next(r for r in records if r.get("skipped") and "warning" in r)
    assert skip["step"] == 2 and skip["example_ids"] == expected_example_ids(out, 2, 1)
    assert "step 2: the loss is not finite; skipped the update" in skip["warning"]
    assert json.loads((out / "run_state.json").read_text())["status"] == "finished"
    assert (out / "final" / "model.safetensors").is_file()


@pytest.mark.slow
@pytest.mark.faults
def test_on_nonfinite_stop_stops_at_the_first_nan_gradient_naming_step_examples_and_last_checkpoint(
        tiny_model_dir, tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    inject(monkeypatch, "grad", "2")  # the loss stays finite: only the gradient norm tells
    with pytest.raises(SystemExit) as stopped:
        main(["train", *tiny_overrides(tiny_model_dir, out, *SAVE_EVERY_STEP, "trainer.on_nonfinite=stop")])
    assert stopped.value.code == 2
    message = squeezed(capsys.readouterr().err)
    ids = expected_example_ids(out, 2, 1)
    assert squeezed(f"step 2: the gradient norm is not finite (trainer.on_nonfinite=stop); the step's training examples "
            f"(indices into the training set): [{', '.join(map(str, ids))}]; nothing was saved after it, the last "
            f"good checkpoint is {out / 'checkpoints' / 'checkpoint-1'}") in message
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["checkpoint-1"]
    assert not (out / "final").exists()
    state = json.loads((out / "run_state.json").read_text())
    assert state["status"] == "failed" and "step 2: the gradient norm is not finite" in state["error"]
    assert read_jsonl(out / "metrics.jsonl")[-1]["stopped"] is True


@pytest.mark.slow
@pytest.mark.faults
def test_more_nan_steps_in_a_row_than_max_nonfinite_skips_stop_the_run(tiny_model_dir, tmp_path, monkeypatch,
                                                                         capsys):
    out = tmp_path / "run"
    inject(monkeypatch, "loss", "2,3")
    with pytest.raises(SystemExit) as stopped:
        main(["train", *tiny_overrides(tiny_model_dir, out, *SAVE_EVERY_STEP, "trainer.max_steps=4",
                                       "trainer.max_nonfinite_skips=1")])
    assert stopped.value.code == 2
    message = squeezed(capsys.readouterr().err)
    assert squeezed("step 3: the loss is not finite (2 non-finite steps in a row, more than "
                    "trainer.max_nonfinite_skips=1)") in message
    assert squeezed(f"the last good checkpoint is {out / 'checkpoints' / 'checkpoint-2'}") in message
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["checkpoint-1", "checkpoint-2"]
    assert_same_state(out / "checkpoints" / "checkpoint-1", out / "checkpoints" / "checkpoint-2")
    assert not (out / "final").exists()
    assert json.loads((out / "run_state.json").read_text())["status"] == "failed"


def start_poisoned_ranks(tmp_path, args: list[str], kind: str, steps: str, rank: int, micro: int):
    return start_ranks(args, tmp_path, script=INJECTION,
                       extra_env={"OTR_NONFINITE": kind, "OTR_NONFINITE_STEPS": steps,
                                  "OTR_NONFINITE_RANK": str(rank), "OTR_NONFINITE_MICRO": str(micro)})


def run_ranks(processes, timeout: float = 300) -> list:
    try:
        return wait_all(processes, timeout=timeout)
    finally:
        for process in processes:
            process.kill()


@pytest.mark.slow
@pytest.mark.faults
@pytest.mark.parametrize("zero,kind", [(0, "loss"), (2, "grad"), (3, "grad")])
def test_a_nan_in_one_micro_batch_of_one_of_two_ranks_skips_the_step_on_both(tiny_model_dir, tmp_path, zero, kind):
    """Rank 1's second micro-batch of step 2 has a NaN loss (ZeRO-0) or NaN gradients with a finite loss
    (ZeRO-2, ZeRO-3: partitioned inside DeepSpeed's optimizer); both ranks skip step 2 and go on."""
    out = tmp_path / "run"
    args = ["train", *tiny_overrides(tiny_model_dir, out, *SAVE_EVERY_STEP, "trainer.micro_batch_size=2",
                                     "trainer.grad_accum=2", f"deepspeed=zero{zero}", "optim.scheduler=linear",
                                     "optim.warmup_steps=0", "optim.min_lr_ratio=0")]
    codes = run_ranks(start_poisoned_ranks(tmp_path, args, kind, "2", rank=1, micro=1))
    logs = [flat(tmp_path / f"rank{r}.log") for r in range(2)]
    assert codes == [0, 0], (codes, logs)
    checkpoints = out / "checkpoints"
    # Every rank's partition of the weights and of the Adam moments is in the checkpoint: a rank that had
    # stepped would show here.
    assert_same_state(checkpoints / "checkpoint-1", checkpoints / "checkpoint-2")
    assert_finite_state(checkpoints / "checkpoint-3")
    records = read_jsonl(out / "metrics.jsonl")
    skips = [r for r in records if "warning" in r and r.get("skipped")]
    assert [(r["step"], r["nonfinite"]) for r in skips] == [(2, "loss" if kind == "loss" else "gradient")]
    assert skips[0]["example_ids"] == expected_example_ids(out, 2, 2)
    steps = {r["step"]: r for r in records if "loss" in r}
    assert steps[2]["skipped"] is True and "skipped" not in steps[1] and "skipped" not in steps[3]
    # A NaN loss is reported as NaN; NaN gradients under a finite loss leave the loss finite.
    assert [s for s, r in steps.items() if r["loss"] == r["loss"]] == ([1, 3] if kind == "loss" else [1, 2, 3])
    # The schedule follows the step counter, also where DeepSpeed's engine skipped and held it back (ZeRO 2, 3).
    assert [steps[s]["lr"] for s in (1, 2, 3)] == pytest.approx([1e-3, 2e-3 / 3, 1e-3 / 3])
    assert (out / "final" / "model.safetensors").is_file()


@pytest.mark.slow
@pytest.mark.faults
def test_nan_gradients_beyond_the_skip_limit_stop_both_ranks_under_zero2(tiny_model_dir, tmp_path):
    out = tmp_path / "run"
    args = ["train", *tiny_overrides(tiny_model_dir, out, *SAVE_EVERY_STEP, "trainer.micro_batch_size=2",
                                     "trainer.max_steps=4", "trainer.max_nonfinite_skips=1", "deepspeed=zero2")]
    codes = run_ranks(start_poisoned_ranks(tmp_path, args, "grad", "2,3", rank=1, micro=0))
    logs = [flat(tmp_path / f"rank{r}.log") for r in range(2)]
    assert codes == [2, 2], (codes, logs)
    for rank, log in enumerate(logs):
        assert squeezed(f"[rank {rank}] failed; stopping all 2 ranks: NonFiniteStop: step 3: the gradient norm is "
                        f"not finite (2 non-finite steps in a row") in squeezed(log), log
    ids = ", ".join(map(str, expected_example_ids(out, 3, 2)))
    assert squeezed(f"[{ids}]; nothing was saved after it, the last good checkpoint is "
                    f"{out / 'checkpoints' / 'checkpoint-2'}") in squeezed(logs[0])
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["checkpoint-1", "checkpoint-2"]
    assert not (out / "final").exists()
    assert json.loads((out / "run_state.json").read_text())["status"] == "failed"


@pytest.mark.faults
def test_a_learning_rate_too_large_for_float32_is_refused_naming_optim_lr(tmp_path, capsys):
    """optim.lr=1e38 used to train into a raw 'value cannot be converted to type float without overflow'."""
    with pytest.raises(SystemExit) as refused:
        main(["train", f"run.output_dir={tmp_path / 'run'}", "optim.lr=1e38"])
    assert refused.value.code == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "optim.lr=1e+38 is too large: Adam's first update lr / (1 - beta1) = 1e+39 exceeds float32's" in err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("override,message", [
    ("trainer.on_nonfinite=ignore", "trainer.on_nonfinite='ignore' is not one of skip, stop"),
    ("trainer.max_nonfinite_skips=-1", "trainer.max_nonfinite_skips=-1 must be >= 0"),
    ("optim.lr=nan", "optim.lr=nan must be a finite number > 0"),
])
def test_a_bad_nonfinite_setting_is_refused_naming_its_key(tmp_path, capsys, override, message):
    with pytest.raises(SystemExit):
        main(["train", f"run.output_dir={tmp_path / 'run'}", override])
    assert message in " ".join(capsys.readouterr().err.split())


@pytest.mark.faults
def test_an_fp16_loss_scale_overflow_is_reported_not_counted_as_a_nonfinite_skip():
    """fp16 needs a GPU under DeepSpeed; here its optimizer's answer after an overflow (step not applied, the
    scale lowered) is stood in for, on a real torch optimizer."""
    from types import SimpleNamespace

    from otr_cli.train.nonfinite import NonFiniteGuard

    inner = torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))], lr=0.1)
    fp16_optimizer = SimpleNamespace(optimizer=inner, overflow=True, loss_scale=2.0 ** 15)
    deepspeed = SimpleNamespace(optimizer=fp16_optimizer, was_step_applied=lambda: False, lr_scheduler=None)
    guard = NonFiniteGuard("stop", 0, SimpleNamespace(deepspeed=deepspeed, precision="fp16"), is_main=True)
    written: list[dict] = []
    with guard.update(loss=3.5, gradient_norm=None):
        pass
    outcome = guard.conclude(5, lambda: [1, 2], None, written.append)
    assert outcome.fields == {"skipped": True, "loss_scale_overflow": True, "loss_scale": 32768.0}
    assert guard.consecutive == 0 and not written  # on_nonfinite=stop did not stop


@pytest.mark.slow
@pytest.mark.faults
def test_a_diverging_learning_rate_stops_the_run_before_any_nan_checkpoint(tiny_model_dir, tmp_path, capsys):
    """optim.lr=1e30 used to give NaN weights from step 2 on, in every checkpoint and final/, and exit 0."""
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as stopped:
        main(["train", *tiny_overrides(tiny_model_dir, out, *SAVE_EVERY_STEP, "optim.lr=1e30", "trainer.max_steps=8",
                                       "trainer.max_nonfinite_skips=2")])
    assert stopped.value.code == 2
    message = squeezed(capsys.readouterr().err)
    assert squeezed("3 non-finite steps in a row, more than trainer.max_nonfinite_skips=2") in message
    saved = sorted((out / "checkpoints").iterdir())
    assert saved and not (out / "final").exists()
    for checkpoint in saved:
        assert_finite_state(checkpoint)
    assert squeezed(f"the last good checkpoint is {saved[-1]}") in message
    assert json.loads((out / "run_state.json").read_text())["status"] == "failed"
