"""`otr data`: the training data as `otr train` would build it, looked at before training (docs/data.md,
"Look at your data before training")."""

from __future__ import annotations

import json
import math

import pytest

from helpers import run_cli, tiny_overrides
from otr_cli.config import TrainConfig
from otr_cli.data import collate_batch, collate_packed, encode_conversation
from otr_cli.data.examples import TokenizedExample
from otr_cli.data.inspect import (length_stats, marked_text, packed_cost, padded_cost, rendered_spans,
                                  supervised_runs)
from otr_cli.errors import UserError
from otr_cli.train.batches import StepPlan
from otr_cli.train.data_command import (DataOptions, default_world_size, epoch_micro_batches, packed_rows_for,
                                        split_flags)

# -- flags ------------------------------------------------------------------------------------------


def test_plain_flags_are_taken_off_before_hydra_sees_the_overrides():
    options, overrides = split_flags(["recipe=smollm2_demo", "--examples", "5", "--json", "--ranks=4", "seed=3"])
    assert options == DataOptions(examples=5, as_json=True, ranks=4)
    assert overrides == ["recipe=smollm2_demo", "seed=3"]
    assert split_flags(["--examples=0"])[0].examples == 0
    assert split_flags([]) == (DataOptions(), [])


@pytest.mark.parametrize("args, message", [(["--examples", "many"], "--examples needs a whole number >= 0"),
                                           (["--ranks=0"], "--ranks needs a whole number >= 1"),
                                           (["--ranks"], "--ranks needs a value")])
def test_a_bad_flag_value_is_a_user_error(args, message):
    with pytest.raises(UserError, match=message):
        split_flags(args)


# -- what is computed -------------------------------------------------------------------------------


def _example(tokenizer, question: str, answer: str) -> TokenizedExample:
    messages = [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
    return encode_conversation(messages, tokenizer, None, "test", {})


def test_supervised_text_is_marked_and_is_exactly_the_assistant_reply(tokenizer):
    example = _example(tokenizer, "What is 2 + 2?", "The answer is 4.")
    runs = supervised_runs(example)
    assert [token for ids, _ in runs for token in ids] == example.input_ids
    text = marked_text(rendered_spans(example, tokenizer))
    assert text.count("⟦") == 1 and text.count("⟧") == 1
    assert text[text.index("⟦") + 1:text.index("⟧")] == "The answer is 4.<|im_end|>"
    assert "What is 2 + 2?" in text[:text.index("⟦")]


def test_padding_counts_are_the_shapes_of_training_collation(tokenizer):
    examples = [_example(tokenizer, "q" * n, "a " * (3 * n)) for n in (1, 5, 9, 2, 7)]
    lengths = [len(example.input_ids) for example in examples]
    batches = [[0, 1, 2], [3, 4]]
    padded = padded_cost(batches, lengths)
    assert padded.positions == sum(collate_batch([examples[i] for i in b], 0)["input_ids"].numel() for b in batches)
    assert padded.real_tokens == sum(lengths) and padded.padding_share > 0
    capacity = max(lengths) + 5
    packed = packed_cost(batches, lengths, capacity)
    assert packed.positions == sum(collate_packed([examples[i] for i in b], 0, capacity)["input_ids"].numel()
                                   for b in batches)
    one_row = packed_cost(batches, lengths, None)
    assert (one_row.positions, one_row.padding_share) == (sum(lengths), 0.0)


@pytest.mark.parametrize("group_by_length, max_tokens_per_batch", [(False, 0), (True, 0), (False, 80)])
def test_epoch_micro_batches_are_the_micro_batches_every_rank_trains_on(group_by_length, max_tokens_per_batch):
    typed = TrainConfig()
    typed.trainer.micro_batch_size, typed.trainer.grad_accum = 3, 2
    typed.data.group_by_length = group_by_length
    lengths = [10 + (7 * i) % 23 for i in range(50)]
    world_size = 2
    plan = StepPlan(len(lengths), 3, 2, world_size, seed=typed.seed, shuffle=True, lengths=tuple(lengths),
                    group_by_length=group_by_length, max_tokens_per_batch=max_tokens_per_batch)
    trained = [batch for step in range(plan.steps_for_epochs(1)) for rank in range(world_size)
               for batch in plan.rank_micro_batches(step, rank)]
    shown = epoch_micro_batches(typed, lengths, world_size, max_tokens_per_batch)
    assert sorted(map(tuple, shown)) == sorted(map(tuple, trained))


def test_ranks_default_to_the_launch_environment_else_the_launcher_settings(monkeypatch):
    typed = TrainConfig()
    typed.launcher.nodes, typed.launcher.tasks_per_node = 2, 4
    for name in ("WORLD_SIZE", "SLURM_NTASKS", "SLURM_PROCID", "SLURM_JOB_ID", "SLURM_STEP_ID"):
        monkeypatch.delenv(name, raising=False)
    assert default_world_size(typed) == 8
    monkeypatch.setenv("WORLD_SIZE", "3")
    assert default_world_size(typed) == 3


@pytest.mark.parametrize("attention, expected", [(None, ("otr_sdpa_varlen", None)), ("sdpa", ("otr_sdpa_varlen", None)),
                                                 ("eager", ("eager", 96)), ("flex_attention", (None, None))])
def test_packed_rows_follow_the_attention_kernel_as_in_training(attention, expected):
    typed = TrainConfig()
    typed.model.attn_implementation, typed.data.max_length = attention, 96
    assert packed_rows_for(typed) == expected


def test_length_histogram_covers_every_example_up_to_max_length():
    stats = length_stats([5, 50, 51, 100, 100], upper=100)
    assert (stats.minimum, stats.maximum, stats.median, stats.p95) == (5, 100, 51, 100)
    assert stats.bins[0] == (1, 10, 1) and stats.bins[-1] == (91, 100, 2)
    assert sum(count for _, _, count in stats.bins) == 5


# -- the command --------------------------------------------------------------------------------------


def _data_overrides(model_dir, tmp_path, *extra: str) -> list[str]:
    return [*tiny_overrides(model_dir, tmp_path / "run", f"data.cache_dir={tmp_path / 'cache'}"), *extra]


@pytest.mark.slow
def test_otr_data_shows_counts_lengths_padding_steps_and_marked_examples(tiny_model_dir, tmp_path):
    result = run_cli(["data", *_data_overrides(tiny_model_dir, tmp_path), "--examples", "2"])
    out = result.stdout
    assert "data: 48 records from synthetic_arith (split train)" in out
    assert "data: tokenized cache miss, stored in" in out
    assert "train: 48 examples kept" in out and "0 dropped with no supervised token" in out
    assert "token lengths (48 training examples)" in out and "█" in out
    assert "← this run" in out and "one per example" in out and "padding" in out
    assert f"one epoch: {48 // 4} optimizer steps; this run: 3 steps" in out
    assert "example 1:" in out and "example 2:" in out and "example 3:" not in out
    shown = out.split("(supervised text between ⟦ and ⟧)")[1]
    assert shown.count("⟦") == 2 and shown.count("⟧") == 2 and "The answer is" in shown
    assert not (tmp_path / "run").exists(), "otr data writes no run directory"


@pytest.mark.slow
def test_otr_data_json_is_one_object_for_scripts(tiny_model_dir, tmp_path):
    result = run_cli(["data", *_data_overrides(tiny_model_dir, tmp_path, "data.packing=true"), "--json",
                      "--ranks", "2", "--examples", "1"])
    report = json.loads(result.stdout)
    assert report["report"]["kept"] == 48 and report["report"]["loaded"] == 48
    assert report["cache"]["state"] == "miss"
    assert report["batches"]["world_size"] == 2 and report["batches"]["packing"] is True
    assert report["batches"]["steps_per_epoch"] == math.ceil(48 / (4 * 2))
    assert report["padding"]["packed"]["padding_share"] == 0.0 and report["padding"]["padded"]["padding_share"] > 0
    assert sum(bin_["count"] for bin_ in report["lengths"]["histogram"]) == 48
    assert len(report["examples"]) == 1 and "⟦" in report["examples"][0]["text"]


@pytest.mark.slow
def test_otr_train_after_otr_data_starts_from_a_cache_hit(tiny_model_dir, tmp_path):
    overrides = _data_overrides(tiny_model_dir, tmp_path, "trainer.max_steps=1")
    looked = json.loads(run_cli(["data", *overrides, "--json"]).stdout)
    assert looked["cache"]["state"] == "miss"
    run_cli(["train", *overrides])
    trained = json.loads((tmp_path / "run" / "data_report.json").read_text())
    assert trained["cache"] == "hit", "otr train tokenized again after otr data"
    assert trained["cache_path"] == looked["cache"]["path"]
    counts = ("loaded", "held_out", "kept", "truncated", "dropped_too_long", "dropped_no_supervised", "total_tokens")
    assert {key: trained[key] for key in counts} == {key: looked["report"][key] for key in counts}


@pytest.mark.slow
def test_otr_data_on_bad_data_exits_2_with_one_error_naming_the_line(tmp_path, tiny_model_dir):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "1 + 1?", "answer": "2"}\n{"question": \n')
    result = run_cli(["data", *_data_overrides(tiny_model_dir, tmp_path, f"data.source={bad}",
                                               "data.format=question_answer")], check=False)
    assert result.returncode == 2 and result.stdout == ""
    message = " ".join(result.stderr.split())
    assert message.startswith("error:") and message.count("error:") == 1 and "Traceback" not in message
    assert f"{bad}:2: malformed JSON line" in message


@pytest.mark.slow
def test_otr_data_help_lists_its_flags():
    result = run_cli(["data", "--help"])
    assert result.stdout.startswith("usage: otr data") and all(flag in result.stdout
                                                              for flag in ("--examples", "--ranks", "--json"))


@pytest.mark.slow
def test_otr_data_checks_overrides_and_flags_like_otr_train(tmp_path):
    misspelt = run_cli(["data", "data.max_lenght=64"], check=False)
    assert misspelt.returncode == 2 and "data.max_length" in " ".join(misspelt.stderr.split())
    bad_flag = run_cli(["data", "--examples", "x"], check=False)
    assert bad_flag.returncode == 2 and "--examples needs a whole number" in bad_flag.stderr


def test_in_a_terminal_supervised_text_is_highlighted_instead_of_marked(tmp_path, monkeypatch, capsys):
    from otr_cli.train.data_command import inspect_run_data, print_inspection

    typed = TrainConfig()  # the built-in SmolLM2: its tokenizer, no weights
    typed.data.synthetic.num_train, typed.data.max_length, typed.data.cache_dir = 8, 96, str(tmp_path)
    inspection = inspect_run_data(typed, DataOptions(examples=1))
    monkeypatch.setenv("FORCE_COLOR", "1")  # rich then styles as for a terminal
    print_inspection(inspection)
    out = capsys.readouterr().out
    assert "supervised text highlighted" in out and "⟦" not in out
    assert "\x1b[30;42m" in out  # black on green


@pytest.mark.slow
def test_otr_data_counts_each_source_of_a_mixture(tiny_model_dir, tmp_path):
    alpaca, text = tmp_path / "alpaca.jsonl", tmp_path / "text.jsonl"
    alpaca.write_text("".join(json.dumps({"instruction": f"Say {i}", "output": f"{i}"}) + "\n" for i in range(12)))
    text.write_text("".join(json.dumps({"text": f"document {i}"}) + "\n" for i in range(12)))
    sources = f"data.sources=[{{source: '{alpaca}', weight: 2}}, {{source: '{text}', examples: 5}}]"
    result = run_cli(["data", *_data_overrides(tiny_model_dir, tmp_path, sources), "--examples", "0"])
    out = result.stdout
    assert f"source 1: {alpaca} (weight 2), format alpaca: 12 records, 12 drawn, 12 kept" in out
    assert f"source 2: {text} (5 examples), format text: 12 records, 5 drawn, 5 kept" in out
    assert "train: 17 examples kept" in out
