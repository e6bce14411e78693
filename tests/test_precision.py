"""One precision setting: deepspeed.precision decides, model.dtype follows or is refused; bf16 keeps fp32 masters."""

from __future__ import annotations

import pytest

from helpers import tiny_overrides
from otr_cli.cli import main
from otr_cli.config import ConfigError, check_precision_keys
from otr_cli.train.precision import choose_precision


def test_model_dtype_that_disagrees_with_deepspeed_precision_is_refused_naming_both_keys(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "recipe=smollm2_demo", "dry_run=true", "model.dtype=bfloat16", "deepspeed.precision=fp32"])
    assert exit_info.value.code == 2
    err = " ".join(capsys.readouterr().err.split())  # rich wraps the one line at the terminal's width
    assert err.startswith("error: model.dtype=bfloat16 and deepspeed.precision=fp32 disagree")
    assert "set model.dtype=auto, or deepspeed.precision=bf16" in err
    with pytest.raises(ConfigError) as refused:
        check_precision_keys("bfloat16", "fp32")
    assert "\n" not in str(refused.value)


@pytest.mark.parametrize("model_dtype, precision", [("float32", "bf16"), ("float16", "bf16"), ("bfloat16", "fp16")])
def test_every_disagreeing_pair_of_precision_keys_is_refused(capsys, model_dtype, precision):
    with pytest.raises(SystemExit):
        main(["train", "recipe=smollm2_demo", "dry_run=true", f"model.dtype={model_dtype}", f"deepspeed.precision={precision}"])
    err = " ".join(capsys.readouterr().err.split())
    assert f"model.dtype={model_dtype} and deepspeed.precision={precision} disagree" in err


def test_agreeing_precision_keys_pass(capsys):
    main(["train", "recipe=smollm2_demo", "dry_run=true", "model.dtype=bfloat16", "deepspeed.precision=bf16"])
    assert "precision: bf16" in capsys.readouterr().out


@pytest.mark.parametrize("native_bf16", [True, False])
@pytest.mark.parametrize("on_gpu", [True, False])
def test_explicit_precision_wins_on_every_device(on_gpu, native_bf16):
    for precision in ("fp32", "bf16", "fp16"):
        choice = choose_precision(precision, "auto", on_gpu, native_bf16)
        assert choice.precision == precision and f"deepspeed.precision={precision}" in choice.reason


def test_auto_precision_follows_an_explicit_model_dtype_with_fp32_master_weights():
    # model.dtype=bfloat16 used to train pure bf16 on CPU (no fp32 master copy): now it is bf16 mixed precision.
    choice = choose_precision("auto", "bfloat16", on_gpu=False, native_bf16=False)
    assert (choice.precision, choice.weights_dtype, choice.mixed) == ("bf16", "bfloat16", True)
    assert "model.dtype=bfloat16" in choice.reason
    assert choose_precision("auto", "float32", on_gpu=True, native_bf16=True).precision == "fp32"


def test_auto_precision_is_bf16_on_gpus_with_bf16_and_fp32_on_older_ones():
    assert choose_precision("auto", "auto", on_gpu=True, native_bf16=True).precision == "bf16"
    older = choose_precision("auto", "auto", on_gpu=True, native_bf16=False)
    assert older.precision == "fp32" and "without bf16" in older.reason


def test_auto_precision_on_cpu_is_fp32_and_points_amx_cpus_to_bf16():
    amx = choose_precision("auto", "auto", on_gpu=False, native_bf16=True)
    assert amx.precision == "fp32"
    assert "AMX bf16" in amx.reason and "deepspeed.precision=bf16" in amx.reason and "bench_precision" in amx.reason
    plain = choose_precision("auto", "auto", on_gpu=False, native_bf16=False)
    assert plain.precision == "fp32" and "no AMX" in plain.reason


def test_dry_run_says_what_auto_precision_chose_and_why(capsys):
    import torch

    from otr_cli.config import TrainConfig
    from otr_cli.train.precision import precision_for

    main(["train", "recipe=smollm2_demo", "dry_run=true"])
    out = capsys.readouterr().out
    expected = precision_for(TrainConfig(), on_gpu=torch.cuda.is_available())
    assert f"{expected.describe()} (on this machine)" in out
    assert "deepspeed.precision=auto on a" in expected.reason
    assert f'"enabled": {"true" if expected.precision == "bf16" else "false"}' in out


def _saved_optimizer_state(run_dir):
    import torch

    [states] = run_dir.glob("checkpoints/*/*/mp_rank_00_model_states.pt")
    return torch.load(states, map_location="cpu", weights_only=False)


@pytest.mark.slow
@pytest.mark.parametrize("precision_keys", [["deepspeed.precision=bf16"], ["model.dtype=bfloat16"]])
def test_bf16_cpu_run_keeps_fp32_master_weights(tiny_model_dir, tmp_path, capsys, precision_keys):
    import torch

    out = tmp_path / "run"
    main(["train", *tiny_overrides(tiny_model_dir, out, "trainer.max_steps=1", "trainer.save_steps=1",
                                   *precision_keys)])
    printed = capsys.readouterr()
    log = " ".join((printed.out + printed.err).split())  # the log's lines wrap at the terminal's width
    assert "precision: bf16 (weights and activations in bf16/fp16, fp32 master weights in the optimizer)" in log
    state = _saved_optimizer_state(out)
    weights = [t for t in state["module"].values() if t.is_floating_point()]
    assert weights and all(t.dtype == torch.bfloat16 for t in weights)
    optimizer = state["optimizer"]
    # DeepSpeed's bf16 mode at ZeRO stage 0 keeps fp32 copies of the weights, which AdamW updates.
    masters = [t for group in optimizer["fp32_groups"] for t in group]
    assert masters and all(t.dtype == torch.float32 for t in masters)
    # One master element per weight element (tied embeddings share one storage, saved once).
    distinct = {t.untyped_storage().data_ptr(): t.numel() for t in weights}
    assert sum(t.numel() for t in masters) == sum(distinct.values())
    moments = [s["exp_avg"] for s in optimizer["optimizer_state_dict"]["state"].values()]
    assert moments and all(t.dtype == torch.float32 for t in moments)
