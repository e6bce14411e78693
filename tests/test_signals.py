"""The weak-signal warning: fires once on a run without on-policy signal, silent otherwise."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from helpers import read_jsonl, run_cli, tiny_overrides
from otr_cli.train.signals import WeakSignalMonitor


def otr_step(step: int, match_rate: float, objective: str = "otr", unreachable_frac: float = 0.0,
             ce: float = 1.0) -> dict:
    return {"step": step, "objective": objective, "match_rate": match_rate, "p_target": 0.001,
            "unreachable_frac": unreachable_frac, "ce": ce}


def test_weak_signal_warning_fires_once_after_patience_steps_below_threshold():
    monitor = WeakSignalMonitor(threshold=0.01, patience=20)
    messages = [monitor.observe(otr_step(step, 0.002)) for step in range(1, 41)]
    fired = [m for m in messages if m]
    assert len(fired) == 1 and messages[19] is not None
    assert "match rate 0.20%" in fired[0] and "loss.sft_warmup_steps" in fired[0]


def test_weak_signal_warning_stays_silent_when_samples_match():
    monitor = WeakSignalMonitor()
    assert not any(monitor.observe(otr_step(step, 0.3)) for step in range(1, 100))


def test_weak_signal_window_restarts_after_sft_steps():
    monitor = WeakSignalMonitor(patience=5)
    records = [otr_step(s, 0.0) for s in range(1, 5)] + [{"step": 5, "objective": "sft", "ce": 1.0}]
    records += [otr_step(s, 0.0) for s in range(6, 10)]
    assert not any(monitor.observe(r) for r in records)
    assert monitor.observe(otr_step(10, 0.0))  # five OTR steps in a row since the SFT step


def test_unreachable_targets_warning_fires_once_when_many_targets_stay_below_one_in_a_thousand():
    monitor = WeakSignalMonitor(patience=10, unreachable_threshold=0.05)
    records = [otr_step(step, 0.85, unreachable_frac=0.08, ce=1.0 + 0.1 * step) for step in range(1, 21)]
    messages = [monitor.observe(r) for r in records]
    assert [i for i, m in enumerate(messages) if m] == [9]
    assert "8.0% of target tokens have rollout probability q(target) < 0.001" in messages[9]
    assert "match rate is 85%" in messages[9] and "from 1.300 to 1.800 nats" in messages[9]
    assert "loss.sft_warmup_steps" in messages[9] and monitor.fired_rule == "unreachable"


def test_unreachable_rule_judges_the_mean_over_the_window_not_single_steps():
    # One easy batch (3%) does not hide a window that averages 7%...
    dipped = WeakSignalMonitor(patience=5, unreachable_threshold=0.05)
    fractions = [0.08, 0.09, 0.03, 0.08, 0.07]
    assert [bool(dipped.observe(otr_step(s, 0.85, unreachable_frac=f))) for s, f in enumerate(fractions, 1)] == \
        [False] * 4 + [True]
    # ...and one hard batch does not make a healthy window weak.
    spiked = WeakSignalMonitor(patience=5, unreachable_threshold=0.05)
    fractions = [0.01, 0.02, 0.12, 0.01, 0.02, 0.01, 0.0]
    assert not any(spiked.observe(otr_step(s, 0.85, unreachable_frac=f)) for s, f in enumerate(fractions, 1))


def test_unreachable_rule_off_at_threshold_one_and_one_warning_per_run():
    off = WeakSignalMonitor(patience=2, unreachable_threshold=1.0)
    assert not any(off.observe(otr_step(s, 0.5, unreachable_frac=1.0)) for s in range(1, 10))
    # A random model trips both rules at once: the user hears it once, as the match-rate warning.
    both = WeakSignalMonitor(patience=2)
    messages = [m for m in (both.observe(otr_step(s, 0.0, unreachable_frac=1.0)) for s in range(1, 10)) if m]
    assert len(messages) == 1 and "match rate 0.00%" in messages[0] and both.fired_rule == "match_rate"


@pytest.mark.slow
def test_a_run_without_signal_warns_once_in_the_log_and_metrics_and_again_in_the_summary(tiny_model_dir, tmp_path):
    # A random model puts ~1/49152 on each target: K=8 samples almost never match.
    out = tmp_path / "weak"
    result = run_cli(["train", *tiny_overrides(tiny_model_dir, out, "loss=otr", "loss.k=8", "trainer.max_steps=4",
                                               "loss.weak_signal_steps=2")])
    warnings = [r for r in read_jsonl(out / "metrics.jsonl") if "warning" in r]
    assert [w["step"] for w in warnings] == [2]
    assert "weak OTR signal" in warnings[0]["warning"] and "loss.sft_warmup_steps" in warnings[0]["warning"]
    output = result.stderr + result.stdout
    assert output.count("weak OTR signal") == 2 and output.count("warning: weak OTR signal") == 1
    assert json.loads((out / "summary.json").read_text())["warnings"] == [warnings[0]["warning"]]


def replay(run: str) -> list[str]:
    """Feed a recorded real run (tests/data/signal_curves.json) to a monitor with the default settings."""
    recorded = json.loads((Path(__file__).parent / "data" / "signal_curves.json").read_text())["runs"][run]["steps"]
    monitor = WeakSignalMonitor()  # the defaults of loss.weak_signal_* and loss.unreachable_threshold
    fired = []
    for step, objective, match_rate, unreachable_frac, ce in recorded:
        record = {"step": step, "objective": objective, "ce": ce}
        if match_rate is not None:
            record.update(match_rate=match_rate, unreachable_frac=unreachable_frac)
        message = monitor.observe(record)
        if message:
            fired.append(f"step {step}: {message}")
    return fired


@pytest.mark.parametrize("run, step", [("A_otr", 20), ("B_otr", 20)])
def test_recorded_plain_otr_runs_that_failed_trip_the_unreachable_targets_warning(run, step):
    fired = replay(run)
    assert len(fired) == 1 and fired[0].startswith(f"step {step}: ") and "rollout probability" in fired[0]


@pytest.mark.parametrize("run", ["A_warmup_otr", "B_warmup_otr"])
def test_recorded_warmup_then_otr_runs_stay_silent(run):
    assert replay(run) == []


def test_monitor_defaults_are_the_config_defaults():
    from otr_cli.config import LossConfig

    monitor, loss = WeakSignalMonitor(), LossConfig()
    assert (monitor.threshold, monitor.patience, monitor.unreachable_threshold) == \
        (loss.weak_signal_threshold, loss.weak_signal_steps, loss.unreachable_threshold)
