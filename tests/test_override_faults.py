"""Bad command-line overrides, fuzzed: every one is one line naming the key, exit status 2, never a traceback.

A case is drawn from a fixed seed: a command (train or eval), a group, a key of it, and a mistake: a
typo in the key, a value of the wrong type, a value out of range, or a group option that does not
exist. Most cases compose in-process through the function the CLI composes with (compose_config)
and the start-up checks the commands run; a handful run `otr` as a user would, for the exit status
and the shape of stderr.
"""

from __future__ import annotations

import random
import re

import pytest

from helpers import run_cli
from otr_cli.app import compose_config
from otr_cli.config import GROUP_SCHEMAS, TrainConfig, schema_keys
from otr_cli.errors import UserError
from otr_cli.eval.app import EvalRunConfig, check_eval_run, register_eval_schema
from otr_cli.train.command import check_train_config

pytestmark = pytest.mark.faults

# Train cases start from the demo (a complete recipe); eval cases from eval_main's defaults (eval=math).
BASE = {"train": ["recipe=smollm2_demo"], "eval": []}
SCHEMA = {"train": TrainConfig, "eval": EvalRunConfig}
GROUP_OPTIONS = {  # group -> a real option, for typos of it
    "train": {"model": "smollm2_135m_instruct", "data": "gsm8k", "loss": "otr_exact", "optim": "adamw",
              "deepspeed": "zero2_offload", "trainer": "default", "eval": "synthetic_arith", "launcher": "slurm",
              "recipe": "smollm2_gsm8k"},
    # `otr eval model=X` means "evaluate X" (a path), not a group option.
    "eval": {"data": "numina_math_cot", "eval": "quick", "recipe": "smollm2_demo"},
}
# key -> values the start-up checks must refuse (with extra overrides a check needs, after "|").
OUT_OF_RANGE = {
    "optim.lr": ["-1", "0"], "optim.warmup_ratio": ["1", "-0.5"], "optim.betas": ["[0.9]"],
    "optim.scheduler": ["step"],
    "loss.k": ["0", "-3"], "loss.temperature": ["0", "-1"], "loss.beta": ["1", "1.5"], "loss.objective": ["ppo"],
    "loss.baseline": ["median"], "loss.reduction": ["batch"], "loss.sft_warmup_steps": ["-1"],
    "loss.weak_signal_threshold": ["1", "-0.1"], "loss.weak_signal_steps": ["0"], "loss.unreachable_threshold": ["1.5"],
    "deepspeed.zero_stage": ["4", "-1"], "deepspeed.precision": ["fp8"], "deepspeed.optimizer": ["adam"],
    "trainer.micro_batch_size": ["0", "-2"], "trainer.grad_accum": ["0"], "trainer.log_steps": ["0"],
    "trainer.save_steps": ["-1"], "trainer.max_steps": ["0", "-2"], "trainer.save_total_limit": ["0"],
    "trainer.max_tokens_per_batch": ["-1"], "trainer.epochs": ["0|trainer.max_steps=-1", "-1|trainer.max_steps=-1"],
    "trainer.report_to": ["[nope]"],
    "data.max_length": ["1", "0"], "data.validation_size": ["-1", "1.5"], "data.max_examples": ["0"],
    "data.truncation": ["cut"], "data.format": ["xml"], "model.dtype": ["int8"],
    "launcher.name": ["k8s"], "launcher.nodes": ["0"], "launcher.tasks_per_node": ["0"], "launcher.timeout_min": ["0"],
    "launcher.array_parallelism": ["0"], "launcher.signal_delay_s": ["-1"], "launcher.max_requeues": ["-1"],
    "launcher.dist_timeout_min": ["0"], "launcher.data_timeout_min": ["0"], "launcher.signal": ["KILL"],
    "eval.batch_size": ["0"], "eval.max_new_tokens": ["0"], "eval.limit": ["0"], "eval.num_samples": ["0"],
    "eval.top_p": ["0", "1.5"], "eval.temperature": ["-1"], "eval.backend": ["tgi"], "eval.benchmarks": ["[nope]"],
    "eval.vllm.gpu_memory_utilization": ["0", "1.5"], "eval.vllm.tensor_parallel_size": ["0"], "eval.vllm.dtype": ["fp8"],
    "eval.code_workers": ["0"], "eval.sandbox_memory_mb": ["0"],
}
WRONG_TYPE = {"int": ["abc", "1.5", "[1,2]"], "float": ["abc", "1e", "[1]"], "bool": ["maybe", "abc", "[1]"],
              "List": ["5", "abc"], "Dict": ["5", "abc"]}
KINDS = ("typo", "wrong_type", "out_of_range", "unknown_option")


def _typo(word: str, rng: random.Random) -> str:
    """`word` with one character dropped, doubled or swapped with its neighbour."""
    i = rng.randrange(len(word))
    edit = rng.choice(("drop", "double", "swap")) if len(word) > 2 else "double"
    if edit == "drop":
        return word[:i] + word[i + 1:]
    if edit == "double":
        return word[:i] + word[i] + word[i:]
    j = min(i + 1, len(word) - 1)
    return word[:i] + word[j] + word[i] + word[j + 1:] if j != i else word + word[-1]


def _type_family(type_name: str) -> str | None:
    inner = re.sub(r"^Optional\[(.*)\]$", r"\1", str(type_name))
    for family in ("List", "Dict"):
        if inner.startswith(family):
            return family
    return inner if inner in ("int", "float", "bool") else None


def draw_case(seed: int) -> tuple[str, list[str], str, str]:
    """(command, overrides, kind, key the message must name) for fuzz case `seed`."""
    rng = random.Random(seed)
    command = rng.choice(("train", "train", "train", "eval"))
    keys = schema_keys(SCHEMA[command])
    kind = KINDS[seed % len(KINDS)]
    if kind == "unknown_option":
        group, option = rng.choice(sorted(GROUP_OPTIONS[command].items()))
        wrong = rng.choice((_typo(option, rng), "nope"))
        return command, [*BASE[command], f"{group}={wrong}"] if group != "recipe" else [f"recipe={wrong}"], kind, \
            f"{group}={wrong}"
    if kind == "out_of_range":
        key = rng.choice(sorted(k for k in OUT_OF_RANGE if k in keys))
        value, _, extra = rng.choice(OUT_OF_RANGE[key]).partition("|")
        return command, [*BASE[command], *([extra] if extra else []), f"{key}={value}"], kind, key
    if kind == "wrong_type":
        group = rng.choice(sorted({key.split(".")[0] for key in keys if "." in key and _type_family(keys[key])}))
        key = rng.choice(sorted(k for k in keys if k.startswith(group + ".") and _type_family(keys[k])))
        value = rng.choice(WRONG_TYPE[_type_family(keys[key])])
        return command, [*BASE[command], f"{key}={value}"], kind, key
    group = rng.choice(sorted({key.split(".")[0] for key in keys if "." in key}))
    key = rng.choice(sorted(k for k in keys if k.startswith(group + ".")))
    prefix, _, leaf = key.rpartition(".")
    wrong = f"{prefix}.{_typo(leaf, rng)}"
    while wrong in keys:
        wrong = f"{prefix}.{_typo(leaf, rng)}"
    return command, [*BASE[command], f"{wrong}=1"], kind, wrong


def compose_and_check(command: str, overrides: list[str]) -> None:
    """What `otr <command> <overrides>` does before it loads anything."""
    if command == "train":
        check_train_config(compose_config("train", "train", overrides, TrainConfig))
    else:
        register_eval_schema()
        check_eval_run(compose_config("eval_main", "eval", overrides, EvalRunConfig))


def assert_one_line_naming(message: str, named: str) -> None:
    assert "\n" not in message.strip(), message
    assert "Traceback" not in message and "HYDRA_FULL_ERROR" not in message, message
    assert named in message, (named, message)


SEEDS = range(160)


@pytest.mark.parametrize("seed", SEEDS)
def test_fuzzed_bad_override_is_one_line_naming_the_key(seed):
    command, overrides, kind, named = draw_case(seed)
    with pytest.raises(UserError) as raised:
        compose_and_check(command, overrides)
    assert_one_line_naming(str(raised.value), named)


def test_fuzz_covers_every_group_and_kind():
    drawn = [draw_case(seed) for seed in SEEDS]
    assert {command for command, _, _, _ in drawn} == {"train", "eval"}

    def groups(kind: str, command: str = "train") -> set[str]:
        return {re.split(r"[.=]", named)[0] for cmd, _, k, named in drawn if k == kind and cmd == command}

    assert groups("typo") == set(GROUP_SCHEMAS) | {"run"} and groups("typo", "eval") == {"model", "data", "eval", "run"}
    assert groups("unknown_option") == set(GROUP_OPTIONS["train"]) and groups("unknown_option", "eval")
    # Every group at least; `run` too once it has typed keys of its own (run.lock_stale_min).
    assert groups("wrong_type") >= set(GROUP_SCHEMAS)
    assert groups("out_of_range") >= set(GROUP_SCHEMAS) - {"model"}


@pytest.mark.parametrize("group", sorted(GROUP_SCHEMAS))
def test_typo_in_a_key_of_every_group_suggests_the_real_key(group):
    rng = random.Random(group)
    keys = schema_keys(TrainConfig)
    for key in rng.sample(sorted(k for k in keys if k.startswith(group + ".")), 3):
        prefix, _, leaf = key.rpartition(".")
        wrong = f"{prefix}.{leaf}x"
        with pytest.raises(UserError) as raised:
            compose_and_check("train", ["recipe=smollm2_demo", f"{wrong}=1"])
        assert_one_line_naming(str(raised.value), f"Did you mean: {key}")


@pytest.mark.parametrize("override, named", [
    ("loss=nope", "available: dft, otr, otr_exact, sft"),
    ("deepspeed=zero9", "Did you mean: zero3"),
    ("recipe=smollm2_dem", "Did you mean: smollm2_demo"),
])
def test_unknown_group_option_lists_the_options_and_the_closest(override, named):
    with pytest.raises(UserError) as raised:
        compose_and_check("train", [override])
    assert_one_line_naming(str(raised.value), named)


def test_train_checks_eval_settings_at_start_up():
    # Found by the fuzz (out-of-range eval.* keys): `otr train` accepted eval.batch_size=0 and failed at the
    # first evaluation, after the training.
    with pytest.raises(UserError) as raised:
        compose_and_check("train", ["recipe=smollm2_demo", "eval.batch_size=0"])
    assert_one_line_naming(str(raised.value), "eval.batch_size=0 must be > 0")


def test_eval_checks_the_data_keys_at_start_up():
    # Found by the fuzz, seed 106: `otr eval data.format=xml` was accepted without a word.
    assert draw_case(106) == ("eval", ["data.format=xml"], "out_of_range", "data.format")
    with pytest.raises(UserError) as raised:
        compose_and_check("eval", ["data.format=xml"])
    assert_one_line_naming(str(raised.value), "data.format='xml' is not one of")


@pytest.mark.slow
@pytest.mark.parametrize("args", [
    ["train", "recipe=nope", "dry_run=true"],
    ["train", "trainer.max_steps=abc", "dry_run=true"],
    ["train", "recipe=smollm2_demo", "deepspeed=zero9"],
    ["train", "recipe=smollm2_demo", "optim.lr=-1", "dry_run=true"],
    ["train", "recipe=smollm2_demo", "+trainer.max_step=3", "dry_run=true"],
    ["train", "dry_run=true"],
    ["train", "missing_recipe.yaml"],
    ["eval", "eval=nope"],
    ["eval", "eval.batch_size=abc"],
    ["eval", "eval.top_p=2"],
], ids=lambda args: " ".join(args))
def test_otr_bad_override_exits_2_with_one_red_line(args):
    result = run_cli(args, check=False, timeout=300)
    assert result.returncode == 2, result.stderr[-2000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.stderr and "HYDRA_FULL_ERROR" not in result.stderr
