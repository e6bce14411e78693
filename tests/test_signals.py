"""The weak-signal warning: fires once on a run without on-policy signal, silent otherwise."""

from __future__ import annotations

from conftest import read_jsonl, run_cli, tiny_overrides
from otr_cli.train.signals import WeakSignalMonitor


def otr_step(step: int, match_rate: float, objective: str = "otr") -> dict:
    return {"step": step, "objective": objective, "match_rate": match_rate, "p_target": 0.001}


def test_weak_signal_warning_fires_once_after_patience_steps_below_threshold():
    monitor = WeakSignalMonitor(threshold=0.01, patience=20)
    messages = [monitor.observe(otr_step(step, 0.002)) for step in range(1, 41)]
    fired = [m for m in messages if m]
    assert len(fired) == 1 and messages[19] is not None
    assert "match rate 0.20%" in fired[0] and "loss.sft_warmup_steps" in fired[0]


def test_weak_signal_warning_stays_silent_when_samples_match():
    monitor = WeakSignalMonitor()
    assert not any(monitor.observe(otr_step(step, 0.3)) for step in range(1, 100))


def test_weak_signal_streak_resets_on_a_good_step_and_ignores_sft_steps():
    monitor = WeakSignalMonitor(patience=5)
    records = [otr_step(s, 0.0) for s in range(1, 5)] + [otr_step(5, 0.5)] + [otr_step(s, 0.0) for s in range(6, 10)]
    records += [{"step": 10, "objective": "sft", "ce": 1.0}]
    assert not any(monitor.observe(r) for r in records)


def test_a_run_without_signal_warns_once_in_the_log_and_metrics(tiny_model_dir, tmp_path):
    # A random model puts ~1/49152 on each target: K=8 samples almost never match.
    out = tmp_path / "weak"
    result = run_cli(["train", *tiny_overrides(tiny_model_dir, out, "loss=otr", "loss.k=8", "trainer.max_steps=4",
                                               "loss.weak_signal_steps=2")])
    warnings = [r for r in read_jsonl(out / "metrics.jsonl") if "warning" in r]
    assert [w["step"] for w in warnings] == [2]
    assert "weak OTR signal" in warnings[0]["warning"] and "loss.sft_warmup_steps" in warnings[0]["warning"]
    assert (result.stderr + result.stdout).count("weak OTR signal") == 1
