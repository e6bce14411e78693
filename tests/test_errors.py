"""One user-error type: mistakes the user can fix are one red line and exit 2, everything else a traceback.

Each entry point (train, eval, eval compare, grade, sweep) is checked both ways: its own user error,
and an unexpected error (a stand-in for CUDA running out of memory or a grader bug) that must not be
dressed up as a user error.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

from helpers import REPO, subprocess_env, tiny_overrides
from otr_cli.cli import main
from otr_cli.config import ConfigError
from otr_cli.data import DataError
from otr_cli.errors import UserError
from otr_cli.eval.benchmarks import BenchmarkError
from otr_cli.eval.compare import CompareError
from otr_cli.eval.predictions import GradeInputError
from otr_cli.eval.sandbox import IsolationError
from otr_cli.models import ModelSourceError
from otr_cli.study.methods import StudyError
from otr_cli.sweep.summary import SweepError
from otr_cli.train.checkpoints import CheckpointError, RunExistsError

OUT_OF_MEMORY = "CUDA out of memory. Tried to allocate 2.00 GiB (simulated)"


def test_every_user_error_class_derives_from_the_one_base():
    for error in (ConfigError, DataError, BenchmarkError, CompareError, GradeInputError, IsolationError,
                  ModelSourceError, StudyError, SweepError, CheckpointError, RunExistsError):
        assert issubclass(error, UserError), error


def _raise_out_of_memory(*args, **kwargs):
    raise RuntimeError(OUT_OF_MEMORY)


def test_train_non_utf8_data_is_a_user_error_naming_the_file_and_the_byte(tmp_path, capsys):
    data = tmp_path / "d.jsonl"
    data.write_bytes(b'{"question": "1+1?", "answer": "2"}\n\xff\xfe x\n')
    with pytest.raises(SystemExit) as exit_info:
        main(["train", f"data.source={data}", "eval=none", f"run.output_dir={tmp_path / 'out'}",
              "trainer.progress=false", "model.name_or_path=smollm2-135m-instruct"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert f"{data}:2" in err and "not UTF-8" in err and "0xff" in err and "byte 36" in err
    assert "Traceback" not in err


@pytest.mark.slow
def test_train_unexpected_error_is_a_traceback_with_exit_1(tiny_model_dir, tmp_path):
    # A fresh process: the run's fault handler ends it, as on a cluster.
    program = ("import sys\nfrom otr_cli.train import loop\nfrom otr_cli.cli import main\n"
               "def oom(cfg):\n    raise RuntimeError(" + repr(OUT_OF_MEMORY) + ")\n"
               "loop.run_training = oom\nsys.exit(main(sys.argv[1:]))\n")
    result = subprocess.run([sys.executable, "-c", program, "train", *tiny_overrides(tiny_model_dir, tmp_path / "o")],
                            cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 1, result.stderr[-3000:]
    assert "Traceback" in result.stderr and OUT_OF_MEMORY in result.stderr
    assert "error:" not in result.stderr  # not the one red line of a user error


def test_eval_unexpected_error_is_a_traceback_with_exit_1(monkeypatch, tmp_path, capsys):
    from otr_cli.eval import runner

    monkeypatch.setattr(runner, "evaluate_model", _raise_out_of_memory)
    with pytest.raises(SystemExit) as exit_info:
        main(["eval", "model=smollm2-135m-instruct", "eval=synthetic_arith", f"run.output_dir={tmp_path}"])
    assert exit_info.value.code == 1  # Hydra prints the traceback of an error in the task and exits 1
    assert OUT_OF_MEMORY in capsys.readouterr().err


def test_eval_user_error_is_one_line_with_exit_2(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["eval", "model=smollm2-135m-instruct", "eval.benchmarks=[]", f"run.output_dir={tmp_path}"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "eval.benchmarks is empty" in err and "Traceback" not in err


@pytest.mark.parametrize("command, target", [
    (["grade", "p.jsonl", "--grader", "math"], "otr_cli.eval.predictions.grade_command"),
    (["eval", "compare", "a", "b"], "otr_cli.eval.compare.compare_command"),
    (["sweep", "summary", "somewhere"], "otr_cli.sweep.command.summary_command"),
], ids=["grade", "eval-compare", "sweep"])
def test_unexpected_errors_of_the_other_entry_points_are_not_user_errors(monkeypatch, command, target):
    module, name = target.rsplit(".", 1)
    monkeypatch.setattr(f"{module}.{name}", _raise_out_of_memory)
    with pytest.raises(RuntimeError, match="out of memory"):
        main(command)


@pytest.mark.parametrize("command, message", [
    (["grade", "missing.jsonl", "--grader", "math"], "missing.jsonl"),
    (["grade", "p.jsonl", "--grader", "code", "--isolation", "chroot"], "isolation"),
    (["eval", "compare", "no/such/a", "no/such/b"], "no/such/a"),
    (["sweep", "summary", "no/such/sweep"], "no/such/sweep"),
], ids=["grade", "grade-isolation", "eval-compare", "sweep"])
def test_user_errors_of_the_other_entry_points_are_one_line_with_exit_2(tmp_path, monkeypatch, capsys, command,
                                                                         message):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "p.jsonl").write_text('{"completion": "print(1)", "gold": "", "test": "", "entry_point": "f"}\n')
    with pytest.raises(SystemExit) as exit_info:
        main(command)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_study_script_reports_user_errors_in_one_line():
    study = subprocess.run([sys.executable, "scripts/reproduce.py", "--jobs", "0"], cwd=REPO, env=subprocess_env(),
                           capture_output=True, text=True, timeout=120)
    assert study.returncode == 2 and study.stderr.startswith("error: --jobs 0") and "Traceback" not in study.stderr


@pytest.mark.faults
def test_a_long_user_error_is_one_physical_line_in_a_pipe():
    """rich wraps at 80 columns when stderr is not a terminal; a script reading the error, or a user
    grepping a log, must get the message on one line."""
    message = "data.source=/a/very/long/path/" + "x" * 150 + ".jsonl: not found; check the path and try again"
    program = f"from otr_cli.errors import fail; fail({message!r})"
    done = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, cwd=REPO,
                          env=subprocess_env())
    assert done.returncode == 2
    assert done.stderr.rstrip("\n").splitlines() == [f"error: {message}"]
