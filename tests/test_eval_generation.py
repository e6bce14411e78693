"""Batched generation: input order, left padding equal to one-at-a-time greedy, samples, stop strings."""

import pytest

from otr_cli.eval.generation import GenerationSettings, cut_at_stop, generate_completions, generate_hf


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval(), AutoTokenizer.from_pretrained(tiny_model_dir)


PROMPTS = ["<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n",
           "<|im_start|>user\nA much longer question about apples and pears and sums?<|im_end|>\n<|im_start|>assistant\n",
           "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n"]


def test_batched_left_padded_greedy_equals_one_prompt_at_a_time(tiny):
    model, tokenizer = tiny
    settings = GenerationSettings(max_new_tokens=8)
    batched = generate_hf(model, tokenizer, PROMPTS, settings, batch_size=3)
    single = [generate_hf(model, tokenizer, [p], settings, batch_size=1)[0] for p in PROMPTS]
    assert batched == single and all(len(s) == 1 for s in batched)


def test_completions_come_back_in_input_order_and_padding_side_is_restored(tiny):
    model, tokenizer = tiny
    tokenizer.padding_side = "right"
    seen = []
    out = generate_completions(model, tokenizer, PROMPTS, batch_size=2, max_new_tokens=4, on_batch=seen.append)
    assert len(out) == 3 and sum(seen) == 3 and tokenizer.padding_side == "right"
    assert out == [generate_completions(model, tokenizer, [p], batch_size=1, max_new_tokens=4)[0] for p in PROMPTS]


def test_sampling_returns_num_samples_per_prompt_and_is_seeded(tiny):
    model, tokenizer = tiny
    settings = GenerationSettings(max_new_tokens=5, num_samples=3, temperature=1.0, seed=7)
    first = generate_hf(model, tokenizer, PROMPTS[:2], settings, batch_size=2)
    assert [len(s) for s in first] == [3, 3]
    assert generate_hf(model, tokenizer, PROMPTS[:2], settings, batch_size=2) == first


def test_stop_strings_cut_the_completion():
    assert cut_at_stop("step 1\nQuestion: next", ("Question:", "\n\n")) == "step 1\n"
    assert cut_at_stop("no stop here", ("Question:",)) == "no stop here"
    assert cut_at_stop("a\n\nb Question:", ("Question:", "\n\n")) == "a"
