"""`otr train` with data.packing: the same losses as unpacked, exact resume, 2 ranks = 1 rank."""

from __future__ import annotations

import json
import shutil

import pytest

from helpers import read_jsonl, tiny_overrides
from otr_cli.cli import main
from test_rehearsal import RELEASE_PARAMETERS
from test_train_distributed import torchrun


def losses(run_dir) -> list[dict]:
    return [r for r in read_jsonl(run_dir / "metrics.jsonl") if "loss" in r]


@pytest.mark.slow
def test_packed_run_logs_the_same_otr_losses_as_an_unpacked_run(tiny_model_dir, tmp_path):
    # K=8 OTR rollouts: packed rows hand the supervised positions to the kernel in the unpacked order,
    # so the same tokens are drawn; only float rounding separates the two runs.
    common = ["loss=otr", "loss.k=8", "loss.beta=-0.1", "trainer.max_steps=3", "trainer.micro_batch_size=6",
              "data.max_length=96"]
    main(["train", *tiny_overrides(tiny_model_dir, tmp_path / "unpacked", *common)])
    # The default packed layout: sdpa per example, each micro-batch one row without padding.
    main(["train", *tiny_overrides(tiny_model_dir, tmp_path / "packed", *common, "data.packing=true")])
    unpacked, packed = losses(tmp_path / "unpacked"), losses(tmp_path / "packed")
    assert [r["step"] for r in packed] == [1, 2, 3]
    for left, right in zip(unpacked, packed):
        assert right["supervised_tokens"] == left["supervised_tokens"]
        assert right["tokens"] == left["tokens"]  # real tokens: padding is never counted
        assert right["padding_frac"] == 0.0  # one row per micro-batch, nothing padded
        assert 0.0 < left["padding_frac"] < 1.0
        for key in ("loss", "ce", "match_rate"):
            assert right[key] == pytest.approx(left[key], rel=1e-4, abs=1e-7), key
    # The kernel otr switched to for training is not written into the exported model.
    exported = (tmp_path / "packed" / "final" / "config.json").read_text()
    assert "otr_sdpa_varlen" not in exported


@pytest.mark.slow
def test_packed_run_with_a_token_budget_resumes_exactly_and_refuses_another_budget(tiny_model_dir, tmp_path,
                                                                                   capsys):
    common = ["loss=otr", "loss.k=8", "data.packing=true", "trainer.max_tokens_per_batch=300",
              "trainer.grad_accum=2", "trainer.max_steps=4", "trainer.save_steps=2"]
    full = tmp_path / "full"
    main(["train", *tiny_overrides(tiny_model_dir, full, *common)])
    state = json.loads((full / "checkpoints" / "checkpoint-2" / "otr_state.json").read_text())
    assert state["max_tokens_per_batch"] == 300
    # The same run, as if killed after step 2's checkpoint.
    cut = tmp_path / "cut"
    shutil.copytree(full, cut)
    shutil.rmtree(cut / "final")
    shutil.rmtree(cut / "checkpoints" / "checkpoint-4")
    (cut / "run_state.json").write_text('{"status": "running"}')
    # Resuming with another token budget would train the remaining steps on other batches: refused,
    # before the model loads, with the run's files left as they were (run_state.json says why it failed).
    changed_budget = [*common[:3], "trainer.max_tokens_per_batch=400", *common[4:]]

    def run_files():
        return {path: path.read_bytes() for path in cut.rglob("*") if path.is_file() and path.name != "run_state.json"}

    files_before = run_files()
    with pytest.raises(SystemExit) as refused:
        main(["train", *tiny_overrides(tiny_model_dir, cut, *changed_budget)])
    assert refused.value.code == 2
    assert "trainer.max_tokens_per_batch: 300 -> 400" in capsys.readouterr().err
    assert run_files() == files_before
    assert json.loads((cut / "run_state.json").read_text())["status"] == "failed"
    main(["train", *tiny_overrides(tiny_model_dir, cut, *common)])
    expected, resumed = losses(full), losses(cut)
    assert [r["step"] for r in resumed] == [1, 2, 3, 4]
    for left, right in zip(expected, resumed):
        assert right["tokens"] == left["tokens"]
        assert right["loss"] == pytest.approx(left["loss"], rel=1e-6)
    # Micro-batches hold as many examples as fit, so steps differ in tokens.
    assert len({r["tokens"] for r in expected}) > 1
    assert all(r["tokens"] <= 2 * 300 for r in expected)


@pytest.mark.slow
@pytest.mark.parametrize("zero", [[], ["deepspeed=zero3", *RELEASE_PARAMETERS]], ids=["zero0", "zero3-released"])
def test_two_ranks_packed_log_the_same_losses_as_one_rank_packed(tiny_model_dir, tmp_path, zero):
    # Under ZeRO-3 with parameters released after every use (as for an 8B model), each packed forward
    # gathers the layers again: both ranks must run the same forwards however many examples they hold.
    common = ["loss=otr_exact", "loss.beta=-0.1", "data.packing=true", "trainer.max_tokens_per_batch=300",
              "trainer.max_steps=3", *zero]
    main(["train", *tiny_overrides(tiny_model_dir, tmp_path / "one", *common, "trainer.grad_accum=2")])
    torchrun(["train", *tiny_overrides(tiny_model_dir, tmp_path / "two", *common, "trainer.grad_accum=1")])
    one, two = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert [r["step"] for r in two] == [1, 2, 3]
    for left, right in zip(one, two):
        assert right["tokens"] == left["tokens"]
        assert right["supervised_tokens"] == left["supervised_tokens"]
        assert right["loss"] == pytest.approx(left["loss"], rel=1e-4, abs=1e-7)
