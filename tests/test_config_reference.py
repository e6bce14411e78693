"""docs/configuration-reference.md: generated from the schema and the recipes, and kept current."""

from __future__ import annotations

import importlib.util
from dataclasses import is_dataclass

import pytest

from helpers import REPO

from otr_cli.config import TrainConfig, schema_keys
from otr_cli.eval.benchmarks import BENCHMARK_NAMES

spec = importlib.util.spec_from_file_location("config_reference", REPO / "scripts" / "config_reference.py")
config_reference = importlib.util.module_from_spec(spec)
spec.loader.exec_module(config_reference)


@pytest.fixture(scope="module")
def reference() -> str:
    return config_reference.render()


def row(reference: str, key: str) -> list[str]:
    line = next(line for line in reference.splitlines() if line.startswith(f"| `{key}` |"))
    return [cell.strip() for cell in line.strip("|").split(" | ")]


def test_committed_configuration_reference_is_what_the_script_generates(reference):
    committed = (REPO / "docs" / "configuration-reference.md").read_text()
    assert committed == reference, (
        "docs/configuration-reference.md is stale (the schema in otr_cli/config.py or a file under recipes/ "
        "changed): regenerate it with `python scripts/config_reference.py` (or `make config-reference`) and commit it")


def test_reference_lists_every_key_recipe_group_option_and_benchmark(reference):
    defaults = TrainConfig()
    for key in schema_keys():
        node = defaults
        for part in key.split("."):
            node = getattr(node, part)
        if not is_dataclass(node):
            assert f"| `{key}` |" in reference, key
    for folder in (REPO / "recipes").iterdir():
        if folder.is_dir():
            for option in folder.glob("*.yaml"):
                assert f"`{option.stem}`" in reference, f"{folder.name}={option.stem}"
    for name in BENCHMARK_NAMES:
        assert f"| `{name}` |" in reference, name


def test_group_columns_show_what_each_option_file_sets_not_the_schema_default(reference):
    header = next(line for line in reference.splitlines() if line.startswith("| key | type | schema | `adamw`"))
    assert header
    assert row(reference, "optim.warmup_ratio")[2:4] == ["0", "**0.03**"]  # schema 0, adamw.yaml sets 0.03
    loss = row(reference, "loss.temperature")  # key, type, schema, dft, otr, otr_exact, sft, meaning
    assert loss[2] == "1" and loss[4] == "**1.3**" and loss[5] == "**1.3**" and loss[6] == "1"
    data = row(reference, "data.max_length")  # gsm8k, numina_math_cot, synthetic_arith
    assert data[2:6] == ["512", "**512**", "**2048**", "**256**"]


def test_check_mode_fails_with_the_regenerate_command_when_the_file_differs(tmp_path, capsys):
    stale = tmp_path / "configuration-reference.md"
    stale.write_text("# old\n")
    assert config_reference.main(["--check", "--output", str(stale)]) == 1
    assert "python scripts/config_reference.py" in capsys.readouterr().err
    assert config_reference.main(["--output", str(stale)]) == 0
    assert config_reference.main(["--check", "--output", str(stale)]) == 0
