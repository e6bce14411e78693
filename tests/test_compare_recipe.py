"""`otr train recipe=smollm2_compare`: SFT alone and SFT warm-up + OTR, run one after the other, side by side."""

from __future__ import annotations

import pytest

import json

from helpers import run_cli, tiny_overrides


@pytest.mark.slow
def test_smollm2_compare_runs_both_arms_and_prints_them_side_by_side(tiny_model_dir, tmp_path):
    sweep = tmp_path / "sweep"
    overrides = [o for o in tiny_overrides(tiny_model_dir, tmp_path / "unused")
                 if not o.startswith(("recipe=", "run.output_dir=", "eval=", "loss.sft_warmup_steps="))]
    result = run_cli(["train", "recipe=smollm2_compare", *overrides, f"hydra.sweep.dir={sweep}",
                      "trainer.max_steps=3", "loss.sft_warmup_steps=2", "loss.k=8", "trainer.save_steps=0",
                      "eval.limit=3", "eval.batch_size=3", "eval.max_new_tokens=8", "eval.before_training=false"])
    side = json.loads((sweep / "side_by_side.json").read_text())
    assert len(side["runs"]) == 2
    assert "loss.objective=sft" in side["runs"][0] and "loss.objective=otr" in side["runs"][1]
    rows = {(r["point"], r["benchmark"]): r["cells"] for r in side["rows"]}
    # Same seed and data order: the two arms are the same model until the warm-up ends.
    warmup = rows[("after SFT warm-up (step 2)", "synthetic_arith")]
    assert warmup[0] == warmup[1] and warmup[0]["n"] == 3
    assert {r["benchmark"] for r in side["paired"]} == {"synthetic_arith", "synthetic_arith_ood"}
    assert (sweep / "side_by_side.png").is_file()
    assert "accuracy, side by side" in result.stdout and "McNemar p" in result.stdout
    objectives = [[json.loads(line)["objective"] for line in (sweep / run / "metrics.jsonl").read_text().splitlines()
                   if "loss" in json.loads(line)] for run in ("0", "1")]
    assert objectives == [["sft", "sft", "sft"], ["sft", "sft", "otr"]]
