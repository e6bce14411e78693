"""Objective schedules (SFT warm-up, loss.phases) and evaluation during training."""

from __future__ import annotations

import json
import shutil

import pytest

from helpers import read_jsonl, tiny_overrides
from otr_cli.cli import main
from otr_cli.config import ConfigError, LossConfig, PhaseConfig
from otr_cli.train.schedule import build_schedule, objective_at, phase_boundaries


def test_no_schedule_is_one_phase_for_the_whole_run():
    phases = build_schedule(LossConfig(objective="otr", beta=-0.1), 10)
    assert [(p.start, p.end, p.options.objective) for p in phases] == [(0, 10, "otr")]
    assert phases[0].options.beta == -0.1


def test_sft_warmup_steps_is_sft_then_the_objective():
    phases = build_schedule(LossConfig(objective="otr", sft_warmup_steps=3, sft_weight=0.5), 10)
    assert [objective_at(phases, step).objective for step in range(10)] == ["sft"] * 3 + ["otr"] * 7
    # The CE mix belongs to the OTR phase only: in the SFT phase it would count CE twice.
    assert objective_at(phases, 0).sft_weight == 0.0 and objective_at(phases, 3).sft_weight == 0.5
    assert list(phase_boundaries(phases)) == [3]


def test_phases_override_loss_settings_and_inherit_the_rest():
    loss = LossConfig(objective="sft", k=64, temperature=1.3, beta=-0.1, phases=[
        PhaseConfig(objective="sft", steps=2), PhaseConfig(objective="otr", steps=3, beta=-0.5),
        PhaseConfig(objective="otr_exact", baseline="mean")])
    phases = build_schedule(loss, 8)
    assert [(p.start, p.end) for p in phases] == [(0, 2), (2, 5), (5, 8)]
    otr = objective_at(phases, 2)
    assert (otr.objective, otr.k, otr.temperature, otr.beta, otr.baseline) == ("otr", 64, 1.3, -0.5, "none")
    exact = objective_at(phases, 7)
    assert (exact.objective, exact.beta, exact.baseline) == ("otr_exact", -0.1, "mean")
    assert list(phase_boundaries(phases)) == [2, 5]


def test_phases_that_end_before_the_run_are_a_clear_error():
    loss = LossConfig(phases=[PhaseConfig(objective="sft", steps=2), PhaseConfig(objective="otr", steps=3)])
    with pytest.raises(ConfigError, match="cover 5 optimizer steps but the run has 8.*steps: -1"):
        build_schedule(loss, 8)


def test_phases_beyond_the_run_are_cut_at_its_end():
    loss = LossConfig(phases=[PhaseConfig(objective="sft", steps=4), PhaseConfig(objective="otr")])
    assert [(p.start, p.end, p.options.objective) for p in build_schedule(loss, 3)] == [(0, 3, "sft")]


def _dry_run_error(capsys, *overrides) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "dry_run=true", *overrides])
    assert exit_info.value.code == 2
    return capsys.readouterr().err


def test_phase_with_unknown_objective_names_its_key(capsys):
    err = _dry_run_error(capsys, "loss.sft_warmup_steps=0",
                         "loss.phases=[{objective:sft,steps:2},{objective:ppo,steps:-1}]")
    assert "loss.phases[1].objective='ppo'" in err


def test_open_ended_phase_before_the_last_is_an_error(capsys):
    err = _dry_run_error(capsys, "loss.sft_warmup_steps=0", "loss.phases=[{objective:sft},{objective:otr}]")
    assert "loss.phases[0].steps=-1" in err


def test_phases_and_sft_warmup_steps_together_are_an_error(capsys):
    err = _dry_run_error(capsys, "loss.sft_warmup_steps=4", "loss.phases=[{objective:sft,steps:2},{objective:otr}]")
    assert "loss.phases and loss.sft_warmup_steps" in err


def _train(tiny_model_dir, out, *extra):
    main(["train", *tiny_overrides(tiny_model_dir, out, *extra)])
    return [r for r in read_jsonl(out / "metrics.jsonl") if "loss" in r]


PHASES = "loss.phases=[{objective:sft,steps:2},{objective:otr,steps:-1,k:8,beta:-0.1}]"


@pytest.mark.slow
def test_schedule_switches_objective_at_the_right_step_and_logs_the_phase(tiny_model_dir, tmp_path):
    records = _train(tiny_model_dir, tmp_path / "run", PHASES, "trainer.max_steps=4")
    assert [(r["step"], r["objective"], r["phase"]) for r in records] == [
        (1, "sft", 0), (2, "sft", 0), (3, "otr", 1), (4, "otr", 1)]
    assert "match_rate" not in records[1] and "match_rate" in records[2]


@pytest.mark.slow
def test_resume_inside_the_schedule_lands_in_the_right_phase_at_the_right_step(tiny_model_dir, tmp_path):
    common = [PHASES, "trainer.max_steps=5", "trainer.save_steps=1", "trainer.save_total_limit=null"]
    reference = _train(tiny_model_dir, tmp_path / "ref", *common)
    # A crash right after the step-1 checkpoint: the resumed run must redo SFT step 2, then OTR.
    resumed_dir = tmp_path / "resumed"
    (resumed_dir / "checkpoints").mkdir(parents=True)
    shutil.copytree(tmp_path / "ref" / "checkpoints" / "checkpoint-1", resumed_dir / "checkpoints" / "checkpoint-1")
    resumed = _train(tiny_model_dir, resumed_dir, *common)
    assert [(r["step"], r["objective"]) for r in resumed] == [(2, "sft"), (3, "otr"), (4, "otr"), (5, "otr")]
    for left, right in zip(reference[1:], resumed):
        for key in ("loss", "ce", "match_rate", "lr"):
            if key in left:
                assert left[key] == pytest.approx(right[key], rel=1e-6, abs=1e-9), (left["step"], key)


def _with_eval(tiny_model_dir, out, *extra):
    overrides = [o for o in tiny_overrides(tiny_model_dir, out) if o != "eval=none"]
    return overrides + ["eval=synthetic_arith", "eval.limit=4", "eval.batch_size=4", "eval.max_new_tokens=8",
                        "eval.before_training=false", "eval.after_warmup=false", *extra]


@pytest.mark.slow
def test_eval_every_steps_scores_a_subset_during_training_without_changing_the_training(tiny_model_dir, tmp_path):
    common = ["loss=otr", "loss.k=8", "trainer.max_steps=4"]
    plain = _train(tiny_model_dir, tmp_path / "plain", *common)
    out = tmp_path / "evals"
    main(["train", *_with_eval(tiny_model_dir, out, *common, "eval.every_steps=2", "eval.every_steps_limit=3")])
    lines = read_jsonl(out / "metrics.jsonl")
    eval_lines = [r for r in lines if any(k.startswith("eval/") for k in r)]
    # Step 4 is the last: the final evaluation covers it.
    assert [r["step"] for r in eval_lines] == [2]
    assert set(eval_lines[0]) == {"step", "eval/synthetic_arith", "eval/synthetic_arith_ood"}
    scores = json.loads((out / "eval" / "step-2" / "summary.json").read_text())
    assert {name: s["n"] for name, s in scores.items()} == {"synthetic_arith": 3, "synthetic_arith_ood": 3}
    summary = json.loads((out / "summary.json").read_text())
    assert summary["eval_during_training"]["2"] == {k[len("eval/"):]: v for k, v in eval_lines[0].items() if k != "step"}
    assert summary["eval"]["final (step 4)"]["synthetic_arith"]["n"] == 4
    # Generating in between does not touch the training's random state or weights.
    trained = [r for r in lines if "loss" in r]
    for left, right in zip(plain, trained):
        assert left["loss"] == pytest.approx(right["loss"], rel=1e-6), left["step"]


@pytest.mark.slow
def test_eval_every_steps_under_zero3_exports_a_temporary_model(tiny_model_dir, tmp_path):
    out = tmp_path / "z3"
    main(["train", *_with_eval(tiny_model_dir, out, "loss=sft", "trainer.max_steps=2", "deepspeed.zero_stage=3",
                               "eval.every_steps=1", "eval.every_steps_limit=2")])
    scores = json.loads((out / "eval" / "step-1" / "summary.json").read_text())
    assert scores["synthetic_arith"]["n"] == 2
    assert not (out / "eval" / "step-1" / "model").exists()


@pytest.mark.slow
def test_after_warmup_evaluates_the_end_of_each_phase_but_the_last(tiny_model_dir, tmp_path):
    out = tmp_path / "phases"
    main(["train", *_with_eval(tiny_model_dir, out, PHASES, "trainer.max_steps=3", "eval.after_warmup=true")])
    summary = json.loads((out / "summary.json").read_text())
    assert list(summary["eval"]) == ["after SFT warm-up (step 2)", "final (step 3)"]
    assert (out / "eval" / "phase-1" / "summary.json").is_file()
    assert (out / "checkpoints" / "checkpoint-2").is_dir()


def test_phase_knob_errors_name_the_key_that_was_written(capsys):
    err = _dry_run_error(capsys, "loss.sft_warmup_steps=0",
                         "loss.phases=[{objective:sft,steps:2},{objective:otr,steps:-1,beta:1.5}]")
    assert "loss.phases[1].beta=1.5" in err and "< 1" in err
    # A value the phase inherits is reported where it was set: in the loss group.
    err = _dry_run_error(capsys, "loss.sft_warmup_steps=0", "loss.temperature=0",
                         "loss.phases=[{objective:sft,steps:2},{objective:otr,steps:-1}]")
    assert "loss.temperature=0" in err


def test_phases_that_do_not_cover_max_steps_fail_before_anything_loads(capsys):
    err = _dry_run_error(capsys, "loss.sft_warmup_steps=0", "trainer.max_steps=10",
                         "loss.phases=[{objective:sft,steps:2},{objective:otr,steps:3}]")
    assert "loss.phases cover 5 optimizer steps but the run has 10" in err


def test_the_schedule_hands_the_kernel_validated_loss_options():
    loss = LossConfig(objective="otr", k=8, beta=-0.2, sft_weight=0.5, chunk_size=64, sft_warmup_steps=2)
    warmup, otr = (phase.options for phase in build_schedule(loss, 5))
    assert (warmup.objective, warmup.sft_weight, warmup.chunk_size, warmup.reduction) == ("sft", 0.0, 64, "sum")
    assert (otr.objective, otr.k, otr.beta, otr.sft_weight, otr.chunk_size) == ("otr", 8, -0.2, 0.5, 64)
