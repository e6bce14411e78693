"""Reading records: local jsonl/json/parquet files and directories, hub ids, synthetic_arith."""

from __future__ import annotations

import gzip
import json

import pytest

from otr_cli.config import DataConfig, SyntheticArithConfig
from otr_cli.data import DataError, load_records, read_source
from otr_cli.data.sources import read_split


def _write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_jsonl_records_keep_their_line_numbers_and_blank_lines_are_skipped(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text('{"q": "a"}\n\n{"q": "b"}\n')
    records = read_source(str(path), "train")
    assert list(records.records) == [{"q": "a"}, {"q": "b"}]
    assert records.where(0) == f"{path}:1"
    assert records.where(1) == f"{path}:3"


def test_malformed_json_line_names_file_line_and_the_json_error(tmp_path):
    path = tmp_path / "broken.jsonl"
    path.write_text('{"question": "ok", "answer": "1"}\n{"question": "oops", "answer": }\n')
    with pytest.raises(DataError) as info:
        read_source(str(path), "train")
    message = str(info.value)
    assert f"{path}:2" in message and "malformed JSON" in message and "Expecting value" in message


def test_a_line_that_is_not_an_object_is_refused_with_its_line(tmp_path):
    path = tmp_path / "list.jsonl"
    path.write_text('{"a": 1}\n[1, 2]\n')
    with pytest.raises(DataError, match=r"list\.jsonl:2: expected a JSON object"):
        read_source(str(path), "train")


def test_gzipped_jsonl_is_read(tmp_path):
    path = tmp_path / "data.jsonl.gz"
    with gzip.open(path, "wt") as handle:
        handle.write('{"prompt": "p", "completion": "c"}\n')
    assert load_records(str(path)) == [{"prompt": "p", "completion": "c"}]


def test_json_list_and_an_object_wrapping_one_list(tmp_path):
    plain = tmp_path / "plain.json"
    plain.write_text(json.dumps([{"a": 1}, {"a": 2}]))
    wrapped = tmp_path / "wrapped.json"
    wrapped.write_text(json.dumps({"version": 1, "data": [{"a": 3}]}))
    assert load_records(str(plain)) == [{"a": 1}, {"a": 2}]
    assert load_records(str(wrapped)) == [{"a": 3}]
    assert read_source(str(plain), "train").where(1) == f"{plain} record 1"


def test_malformed_json_file_names_file_line_and_column(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text('[{"a": 1},\n {"a": }]')
    with pytest.raises(DataError, match=r"bad\.json: malformed JSON .* line 2"):
        read_source(str(path), "train")


def test_parquet_file(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    path = tmp_path / "train.parquet"
    pq.write_table(pa.Table.from_pylist([{"question": "1+1?", "answer": "2"}, {"question": "2+2?", "answer": "4"}]),
                   path)
    records = read_source(str(path), "train")
    assert list(records.records) == [{"question": "1+1?", "answer": "2"}, {"question": "2+2?", "answer": "4"}]
    assert records.where(1) == f"{path} record 1"


def test_directory_reads_the_files_of_the_requested_split(tmp_path):
    _write_jsonl(tmp_path / "train.jsonl", [{"x": "train"}])
    _write_jsonl(tmp_path / "test.jsonl", [{"x": "test"}])
    _write_jsonl(tmp_path / "test_ood.jsonl", [{"x": "ood"}])
    assert load_records(str(tmp_path), "train") == [{"x": "train"}]
    assert load_records(str(tmp_path), "test") == [{"x": "test"}]  # exact name wins over test_ood
    assert load_records(str(tmp_path), "test_ood") == [{"x": "ood"}]


def test_directory_in_hub_layout_with_sharded_parquet(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    (tmp_path / "data").mkdir()
    for shard in range(2):
        pq.write_table(pa.Table.from_pylist([{"i": shard}]), tmp_path / "data" / f"train-0000{shard}-of-00002.parquet")
    pq.write_table(pa.Table.from_pylist([{"i": 9}]), tmp_path / "data" / "test-00000-of-00001.parquet")
    assert load_records(str(tmp_path), "train") == [{"i": 0}, {"i": 1}]


def test_directory_without_the_split_lists_its_files(tmp_path):
    _write_jsonl(tmp_path / "train.jsonl", [{"x": 1}])
    with pytest.raises(DataError, match=r"no file for split 'validation' \(files: train\.jsonl\)"):
        read_source(str(tmp_path), "validation")


def test_missing_local_file_says_so(tmp_path):
    with pytest.raises(DataError, match="no such file or directory"):
        read_source(str(tmp_path / "nope.jsonl"), "train")
    with pytest.raises(DataError, match="no such file"):
        read_source("./relative/missing", "train")


def test_hub_ids_go_through_datasets_load_dataset(monkeypatch):
    import datasets

    calls = []

    def fake_load_dataset(path, name=None, split=None):
        calls.append((path, name, split))
        return datasets.Dataset.from_list([{"question": "q", "answer": "a"}])

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    records = read_source("openai/gsm8k", "train", subset="main")
    assert calls == [("openai/gsm8k", "main", "train")]
    assert records[0] == {"question": "q", "answer": "a"}
    assert records.where(0) == "openai/gsm8k (subset main, split train) row 0"


def test_hub_failure_names_source_subset_and_split(monkeypatch):
    import datasets

    def failing(*args, **kwargs):
        raise ConnectionError("offline")

    monkeypatch.setattr(datasets, "load_dataset", failing)
    with pytest.raises(DataError, match=r"data.source='org/set' with data.subset='x', split 'test': offline"):
        read_source("org/set", "test", subset="x")


def test_synthetic_source_and_load_records_from_a_data_config():
    cfg = DataConfig(source="synthetic_arith", synthetic=SyntheticArithConfig(num_train=5, num_test=3))
    assert len(load_records(cfg)) == 5
    ood = load_records(cfg, "test_ood")
    assert len(ood) == 3 and set(ood[0]) >= {"question", "answer", "final_answer"}
    assert read_source("synthetic_arith", "test", synthetic=cfg.synthetic).where(2) == \
        "synthetic_arith (split test) row 2"


def test_validation_split_can_be_a_file_but_not_a_name_inside_a_single_file(tmp_path):
    train = _write_jsonl(tmp_path / "train.jsonl", [{"x": 1}])
    held = _write_jsonl(tmp_path / "held.jsonl", [{"x": 2}])
    cfg = DataConfig(source=str(train))
    assert list(read_split(cfg, str(held)).records) == [{"x": 2}]
    with pytest.raises(DataError, match="single file.*data.validation_size"):
        read_split(cfg, "test")


def test_csv_and_tsv_are_read_with_every_cell_as_text_and_keep_their_line_numbers(tmp_path):
    csv_path = tmp_path / "train.csv"
    # A quoted cell spanning two lines: the next record starts on line 4, not 3.
    csv_path.write_text('question,answer,w\n"What is 1 + 1?\nThink.",007,0.5\n\nWhat is 2 + 2?,4,1\n')
    records = read_source(str(csv_path), "train")
    assert [dict(record) for record in records.records] == [
        {"question": "What is 1 + 1?\nThink.", "answer": "007", "w": "0.5"},
        {"question": "What is 2 + 2?", "answer": "4", "w": "1"}]
    assert [records.where(i) for i in range(2)] == [f"{csv_path}:2", f"{csv_path}:5"]
    tsv_path = tmp_path / "train.tsv"
    tsv_path.write_text("prompt\tcompletion\nSay hi, please.\tHi, there.\n")
    assert read_source(str(tsv_path), "train").records == [{"prompt": "Say hi, please.", "completion": "Hi, there."}]


def test_csv_goes_through_the_field_mapping_and_weights_like_any_other_file(tokenizer, tmp_path):
    from otr_cli.config import DataConfig
    from otr_cli.data import DataError, build_datasets

    path = tmp_path / "qa.csv"
    path.write_text("Q,A,w\nWhat is 1 + 1?,2,2\nWhat is 2 + 2?,4,0\n")
    cfg = DataConfig(source=str(path), format="question_answer", question_field="Q", answer_field="A",
                     weight_field="w", shuffle=False)
    bundle = build_datasets(cfg, tokenizer, seed=0)
    assert bundle.report.kept == 2 and bundle.report.zero_weight_examples == 1
    assert set(bundle.train[0].weights) == {0.0, 2.0}
    path.write_text("Q,A,w\nWhat is 1 + 1?,2,2\nWhat is 2 + 2?,4,lots\n")
    with pytest.raises(DataError, match=f"{path}:3: field 'w' \\(data.weight_field\\) should be a number"):
        build_datasets(cfg, tokenizer, seed=0)
    path.write_text("Q,B,w\nWhat is 1 + 1?,2,1\n")
    with pytest.raises(DataError, match=f"{path}:2: missing field 'A'"):
        build_datasets(cfg, tokenizer, seed=0)


def test_malformed_csv_row_names_the_file_and_line(tmp_path):
    path = tmp_path / "bad.csv"
    path.write_text("question,answer\nWhat is 1 + 1?,2\nWhat is 2, + 2?,4\n")
    with pytest.raises(DataError, match=f"{path}:3: cannot read as CSV") as error:
        read_source(str(path), "train")
    assert "quoted" in str(error.value)


def test_directory_split_files_may_be_csv(tmp_path):
    (tmp_path / "train.csv").write_text("question,answer\nq,a\n")
    (tmp_path / "test.tsv").write_text("question\tanswer\nq2\ta2\n")
    assert read_source(str(tmp_path), "test").records == [{"question": "q2", "answer": "a2"}]
