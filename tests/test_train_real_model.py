"""`otr train` on the real SmolLM2-135M-Instruct: the embedded recipe, end to end, in a fresh process."""

from __future__ import annotations

import json

import pytest

from helpers import read_jsonl, run_cli


@pytest.mark.slow
def test_smollm2_demo_recipe_trains_evaluates_and_exports_a_loadable_model(tmp_path):
    out = tmp_path / "demo"
    result = run_cli(["train", "recipe=smollm2_demo", "trainer.max_steps=3", "loss.sft_warmup_steps=1",
                      "trainer.micro_batch_size=2", "loss.k=32", "eval.limit=2", "eval.max_new_tokens=24",
                      "data.synthetic.num_validation=4", f"run.output_dir={out}", "trainer.progress=false",
                      # Two OTR steps would be enough to warn: the real model has signal, so it must not.
                      "loss.weak_signal_steps=2"])
    records = [r for r in read_jsonl(out / "metrics.jsonl") if "loss" in r]
    assert [r["objective"] for r in records] == ["sft", "otr", "otr"]
    # A real pretrained model already predicts many target tokens: OTR samples match.
    assert records[-1]["match_rate"] > 0.05
    assert not [r for r in read_jsonl(out / "metrics.jsonl") if "warning" in r]
    assert "weak OTR signal" not in result.stderr + result.stdout
    summary = json.loads((out / "summary.json").read_text())
    assert list(summary["eval"]) == ["before training", "after SFT warm-up (step 1)", "final (step 3)"]
    for results in summary["eval"].values():
        assert set(results) == {"synthetic_arith", "synthetic_arith_ood"}
        assert all(r["n"] == 2 for r in results.values())
    predictions = read_jsonl(out / "eval" / "final" / "synthetic_arith.jsonl")
    assert all(p["completion"] for p in predictions)
    # The accuracy table (its column headers wrap in a narrow terminal).
    printed = result.stderr + result.stdout
    assert "accuracy (greedy" in printed and "warm-up" in printed

    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(out / "final")
    model = AutoModelForCausalLM.from_pretrained(out / "final")
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "What is 2 + 3?"}], tokenize=False,
                                           add_generation_prompt=True)
    encoded = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)
    generated = model.generate(**encoded, max_new_tokens=8, do_sample=False)
    assert generated.shape[1] > encoded["input_ids"].shape[1]
