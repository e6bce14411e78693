"""The end-of-run summary states the measured accuracies plainly."""

from otr_cli.train.progress import describe_evals


def test_summary_sentence_gives_each_point_the_changes_and_what_one_problem_is_worth():
    evals = {"before training": {"arith": {"accuracy": 0.15, "n": 40}},
             "after SFT warm-up (step 20)": {"arith": {"accuracy": 0.2, "n": 40}},
             "final (step 40)": {"arith": {"accuracy": 0.3, "n": 40}, "ood": {"accuracy": 0.0, "n": 40}}}
    assert describe_evals(evals) == [
        "arith: 15.0% before training, 20.0% after SFT warm-up, 30.0% final; +5.0 points from before training "
        "to after SFT warm-up; +10.0 points from after SFT warm-up to final (40 problems, one problem = 2.5 points)."]


def test_summary_table_shows_no_first_step_validation_when_validated_only_at_the_end(capsys):
    from otr_cli.train.progress import print_summary

    records = [{"step": 1, "loss": 1.0, "ce": 1.0}, {"step": 2, "loss": 0.5, "ce": 0.5}, {"step": 2, "val_ce": 0.25}]
    print_summary(records, {"final_model": "out/final", "total_steps": 2, "train_seconds": 3.0})
    val_line = next(line for line in capsys.readouterr().err.splitlines() if "val_ce" in line)
    assert "0.25" in val_line and val_line.count("0.25") == 1 and "-" in val_line
