"""trainer.report_to: TensorBoard, wandb (offline) and MLflow (file store) get what metrics.jsonl gets."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest

from helpers import read_jsonl, read_wandb_records, tiny_overrides
from otr_cli.cli import main
from otr_cli.config import ConfigError, TrainConfig, resolve_report_to, validate
from otr_cli.train.trackers import scalar_name, wandb_mode


@pytest.fixture(autouse=True)
def _no_wandb_login(tmp_path_factory, monkeypatch):
    """The runs here stay offline whatever wandb login the machine has (no network in tests)."""
    empty = tmp_path_factory.mktemp("no-wandb-login")
    for name in ("WANDB_API_KEY", "WANDB_BASE_URL"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("NETRC", str(empty / "netrc"))
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(empty / "wandb-config"))


def _expected(records: list[dict]) -> dict[str, dict[int, float]]:
    """metrics.jsonl as {tracker name: {step: value}}."""
    expected: dict[str, dict[int, float]] = {}
    for record in records:
        for key, value in record.items():
            if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                expected.setdefault(scalar_name(key), {})[record["step"]] = float(value)
    return expected


def _tensorboard_scalars(directory: Path) -> dict[str, dict[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(directory), size_guidance={"scalars": 0})
    events.Reload()
    return {tag: {event.step: event.value for event in events.Scalars(tag)} for tag in events.Tags()["scalars"]}


def _mlflow_runs(store: Path):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=store.as_uri())
    experiments = client.search_experiments()
    runs = [run for experiment in experiments for run in client.search_runs([experiment.experiment_id])]
    return client, experiments, runs


def _mlflow_scalars(client, run) -> dict[str, dict[int, float]]:
    return {name: {m.step: m.value for m in client.get_metric_history(run.info.run_id, name)}
            for name in run.data.metrics}


def _wandb_run(run_root: Path):
    """(run record, {name: {step: value}}) of the single offline run under run_root/wandb."""
    files = list((run_root / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(files) == 1, files
    run, history = None, {}
    for record in read_wandb_records(files[0]):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            run = record.run
        elif kind == "history":
            items = {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item}
            step = items.pop("_step")
            for name, value in items.items():
                if not name.startswith("_"):
                    history.setdefault(name, {})[step] = float(value)
    return run, history


def _assert_equal(logged: dict, expected: dict, tracker: str) -> None:
    assert set(logged) == set(expected), tracker
    for name, values in expected.items():
        assert logged[name].keys() == values.keys(), (tracker, name)
        for step, value in values.items():
            assert logged[name][step] == pytest.approx(value, rel=1e-6), (tracker, name, step)


@pytest.mark.slow
def test_tracker_logs_read_back_with_their_own_readers_equal_metrics_jsonl(tiny_model_dir, tmp_path, monkeypatch,
                                                                          capsys):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("WANDB_SILENT", "true")
    out = tmp_path / "runs" / "tracked"
    main(["train", *tiny_overrides(tiny_model_dir, out, "loss=otr", "loss.k=8", "trainer.eval_steps=2",
                                   "trainer.report_to=[tensorboard,wandb,mlflow]", "run.name=tracked")])
    printed = capsys.readouterr()
    log = " ".join((printed.out + printed.err).split())
    # Said once: which wandb mode and why (no login here: the autouse fixture hides any).
    assert log.count("wandb: offline mode (no WANDB_MODE, WANDB_API_KEY or wandb login;") == 1
    expected = _expected(read_jsonl(out / "metrics.jsonl"))
    assert {"train/loss", "train/ce", "train/learning_rate", "train/grad_norm", "train/epoch", "train/tokens_per_s",
            "train/match_rate", "eval/loss"} <= set(expected)
    assert not {"train/lr", "val_ce"} & set(expected)

    _assert_equal(_tensorboard_scalars(out / "tensorboard"), expected, "tensorboard")

    client, experiments, runs = _mlflow_runs(tmp_path / "runs" / "mlruns")
    assert [e.name for e in experiments if e.name != "Default"] == ["otr"] and len(runs) == 1
    assert runs[0].info.run_name == "tracked" and runs[0].info.status == "FINISHED"
    assert runs[0].data.params["loss.objective"] == "otr" and runs[0].data.params["loss.k"] == "8"
    _assert_equal(_mlflow_scalars(client, runs[0]), expected, "mlflow")

    run, history = _wandb_run(out)
    assert run.display_name == "tracked" and run.project == "otr"
    config = {update.key: json.loads(update.value_json) for update in run.config.update}
    assert config["loss"]["objective"] == "otr" and config["run"]["name"] == "tracked"
    _assert_equal(history, expected, "wandb")


@pytest.mark.slow
def test_a_sweeps_points_share_one_mlflow_experiment_and_wandb_group(tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.chdir(tmp_path)
    overrides = [o for o in tiny_overrides(tiny_model_dir, tmp_path, "trainer.max_steps=1", "run.name=swept",
                                           "trainer.report_to=[wandb,mlflow]", "loss=sft")
                 if not o.startswith("run.output_dir")]
    main(["train", "-m", *overrides, "seed=1,2"])
    sweep = next((tmp_path / "multirun" / "swept").iterdir())
    client, experiments, runs = _mlflow_runs(sweep / "mlruns")
    assert [e.name for e in experiments if e.name != "Default"] == [f"swept/{sweep.name}"]
    assert sorted(run.info.run_name for run in runs) == ["swept-0", "swept-1"]
    assert sorted(run.data.params["seed"] for run in runs) == ["1", "2"]
    groups = {_wandb_run(sweep / str(number))[0].run_group for number in (0, 1)}
    assert groups == {f"swept/{sweep.name}"}


@pytest.mark.slow
def test_resume_with_weights_is_exact_and_continues_the_same_tracker_runs(tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    data = tmp_path / "weighted.jsonl"
    data.write_text("".join(json.dumps({
        "messages": [{"role": "user", "content": f"What is {i} + {i}?"},
                     {"role": "assistant", "content": f"{2 * i}.", "weight": 0 if i % 5 == 0 else 1},
                     {"role": "user", "content": "Sure?"}, {"role": "assistant", "content": f"Yes, {2 * i}."}],
        "w": [0, 0.5, 1, 2][i % 4]}) + "\n" for i in range(24)))
    common = ["loss=otr", "loss.k=8", f"data.source={data}", "data.weight_field=w", "trainer.max_steps=4",
              "trainer.save_steps=2", "trainer.save_total_limit=null", "trainer.report_to=[tensorboard,mlflow]"]
    reference_out = tmp_path / "a" / "run"
    main(["train", *tiny_overrides(tiny_model_dir, reference_out, *common)])
    report = json.loads((reference_out / "data_report.json").read_text())
    assert (report["zero_weight_examples"], report["weighted_examples"], report["context_turns"]) == (6, 12, 5)

    # As a preemption after step 3 leaves it: checkpoint step-2, metrics through step 3, tracker runs (and
    # TensorBoard events) holding later steps too.
    resumed_out = tmp_path / "b" / "run"
    shutil.copytree(reference_out, resumed_out)
    shutil.copytree(tmp_path / "a" / "mlruns", tmp_path / "b" / "mlruns")
    for path in ("checkpoints/checkpoint-4", "final", "summary.json", "run_state.json"):
        target = resumed_out / path
        shutil.rmtree(target) if target.is_dir() else target.unlink()
    metrics = [r for r in read_jsonl(resumed_out / "metrics.jsonl") if r["step"] <= 3]
    (resumed_out / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in metrics))
    main(["train", *tiny_overrides(tiny_model_dir, resumed_out, *common)])

    reference, resumed = read_jsonl(reference_out / "metrics.jsonl"), read_jsonl(resumed_out / "metrics.jsonl")
    assert [r["step"] for r in resumed] == [r["step"] for r in reference]
    for left, right in zip(reference, resumed):
        for key in ("loss", "ce", "match_rate", "grad_norm", "lr", "supervised_tokens"):
            if key in left:
                assert left[key] == pytest.approx(right[key], rel=1e-6, abs=1e-9), (left["step"], key)
    client, _, runs = _mlflow_runs(tmp_path / "b" / "mlruns")
    assert len(runs) == 1, "the resumed run continues the same MLflow run"
    losses = client.get_metric_history(runs[0].info.run_id, "train/loss")
    assert sorted(m.step for m in losses) == [1, 2, 3, 4], "no step twice"
    tensorboard = _tensorboard_scalars(resumed_out / "tensorboard")
    assert sorted(tensorboard["train/loss"]) == [1, 2, 3, 4]
    assert tensorboard["train/loss"][4] == pytest.approx(reference[3]["loss"], rel=1e-6)


def test_tracker_names_are_those_a_transformers_trainer_logs_and_metrics_jsonl_keeps_otrs():
    """A dashboard made for TRL / Trainer runs finds otr's loss, learning rate, gradient norm, epoch and eval loss."""
    record = {"step": 3, "loss": 1.5, "lr": 1e-4, "grad_norm": 0.5, "epoch": 0.25, "val_ce": 2.0, "ce": 1.4,
              "eval/gsm8k": 0.3, "objective": "otr", "skipped": False}
    from otr_cli.train.trackers import scalars

    assert scalars(record) == {"train/loss": 1.5, "train/learning_rate": 1e-4, "train/grad_norm": 0.5,
                               "train/epoch": 0.25, "eval/loss": 2.0, "train/ce": 1.4, "eval/gsm8k": 0.3}


def test_a_tracker_that_is_not_installed_fails_at_start_up_with_the_pip_command(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "wandb", None)  # what Python's import system reads as "not installed"
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "recipe=smollm2_demo", "trainer.report_to=[tensorboard,wandb]", "dry_run=true"])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert "trainer.report_to lists wandb" in error and "pip install 'otr-cli[wandb]'" in error


def test_report_to_names_are_checked_and_none_and_auto_stand_alone():
    assert resolve_report_to(["none"]) == [] and resolve_report_to([]) == []
    assert resolve_report_to(["auto"]) == ["tensorboard"]  # installed with the dev extra
    assert resolve_report_to(["mlflow", "mlflow"]) == ["mlflow"]
    with pytest.raises(ConfigError, match="trainer.report_to='comet' is not one of"):
        resolve_report_to(["comet"])
    with pytest.raises(ConfigError, match="stand alone"):
        resolve_report_to(["none", "wandb"])
    config = TrainConfig()
    config.trainer.report_to = ["neptune"]
    with pytest.raises(ConfigError, match="trainer.report_to"):
        validate(config)


# Two ranks with data weights logging one process's losses to one tracker run (rank 0 alone): part of
# test_train_distributed.py's ZeRO-2 run, which trains the same 2-rank setting anyway.


def test_a_run_that_dies_before_closing_its_trackers_is_marked_failed_in_mlflow(tmp_path, monkeypatch):
    from otr_cli.train.trackers import Trackers, run_identity

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    (tmp_path / "run").mkdir()
    trackers = Trackers(["mlflow"], tmp_path / "run", run_identity(TrainConfig(), tmp_path / "run"))
    trackers.log({"step": 1, "loss": 2.5, "objective": "sft", "warning": None})
    trackers._close_failed()  # what the interpreter runs at exit when close() never ran
    client, _, runs = _mlflow_runs(tmp_path / "mlruns")
    assert runs[0].info.status == "FAILED" and runs[0].data.metrics == {"train/loss": 2.5}


def _home_with_netrc(tmp_path: Path, text: str) -> Path:
    home = tmp_path / "home"
    home.mkdir()
    (home / ".netrc").write_text(text)
    return home


def test_wandb_is_offline_without_wandb_mode_api_key_or_login(tmp_path):
    chosen = wandb_mode({}, tmp_path, tmp_path)
    assert chosen.mode == "offline"
    assert "no WANDB_MODE, WANDB_API_KEY or wandb login" in chosen.reason


def test_wandb_follows_wandb_login_in_netrc(tmp_path):
    home = _home_with_netrc(tmp_path, "machine api.wandb.ai\n  login user\n  password 0123456789abcdef\n")
    chosen = wandb_mode({}, home, tmp_path)
    assert chosen.mode == "online"
    assert str(home / ".netrc") in chosen.reason and "api.wandb.ai" in chosen.reason


def test_wandb_login_for_another_host_or_a_broken_netrc_stays_offline(tmp_path):
    home = _home_with_netrc(tmp_path, "machine github.com login user password secret\n")
    assert wandb_mode({}, home, tmp_path).mode == "offline"
    (home / ".netrc").write_text("machine api.wandb.ai login\n")  # malformed: no value after login
    assert wandb_mode({}, home, tmp_path).mode == "offline"


def test_wandb_netrc_key_for_a_self_hosted_server_counts_for_its_base_url(tmp_path):
    home = _home_with_netrc(tmp_path, "machine wandb.example.org login user password key\n")
    assert wandb_mode({}, home, tmp_path).mode == "offline"
    assert wandb_mode({"WANDB_BASE_URL": "https://wandb.example.org"}, home, tmp_path).mode == "online"
    netrc_elsewhere = {"NETRC": str(home / ".netrc"), "WANDB_BASE_URL": "https://wandb.example.org"}
    assert wandb_mode(netrc_elsewhere, tmp_path, tmp_path).mode == "online"


def test_wandb_api_key_in_the_environment_means_online(tmp_path):
    chosen = wandb_mode({"WANDB_API_KEY": "0123456789abcdef"}, tmp_path, tmp_path)
    assert (chosen.mode, chosen.reason) == ("online", "WANDB_API_KEY is set")


def test_wandb_mode_in_the_environment_wins_over_a_login(tmp_path):
    home = _home_with_netrc(tmp_path, "machine api.wandb.ai login user password key\n")
    chosen = wandb_mode({"WANDB_MODE": "disabled", "WANDB_API_KEY": "key"}, home, tmp_path)
    assert (chosen.mode, chosen.reason) == ("disabled", "WANDB_MODE=disabled")


def test_wandb_offline_command_setting_wins_over_a_login(tmp_path):
    home = _home_with_netrc(tmp_path, "machine api.wandb.ai login user password key\n")
    settings = home / ".config" / "wandb" / "settings"
    settings.parent.mkdir(parents=True)
    settings.write_text("[default]\nmode = offline\n")  # what `wandb offline` writes
    chosen = wandb_mode({}, home, tmp_path)
    assert chosen.mode == "offline" and str(settings) in chosen.reason
    # The directory's own settings (./wandb/settings) override the global file.
    local = tmp_path / "project" / "wandb" / "settings"
    local.parent.mkdir(parents=True)
    local.write_text("[default]\nmode = online\n")
    assert wandb_mode({}, home, tmp_path / "project").mode == "online"
