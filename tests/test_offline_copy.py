"""docs/eval.md, "Offline: a local copy": files written by `datasets`' to_json are what eval.data_dir reads."""

from __future__ import annotations

from datasets import Dataset

from otr_cli.config import DataConfig, EvalConfig
from otr_cli.data import load_records
from otr_cli.eval.benchmarks import few_shot_examples, load_benchmark

# One record per benchmark, with the hub data sets' field names.
RECORDS = {
    "gsm8k/train.jsonl": {"question": "Ann has 2 apples and buys 3. How many?", "answer": "2+3=<<2+3=5>>5\n#### 5"},
    "gsm8k/test.jsonl": {"question": "Bo has 4 pens and loses 1. How many?", "answer": "4-1=3\n#### 3"},
    "math500/test.jsonl": {"problem": "What is $1+1$?", "answer": "2", "unique_id": "test/algebra/1.json"},
    "svamp/test.jsonl": {"ID": "chal-1", "Body": "Tom has 7 cars", "Question": "How many does he have?",
                         "Answer": 7.0},
    "mmlu_stem/test.jsonl": {"question": "2 x 3?", "choices": ["5", "6", "7", "8"], "answer": 1,
                             "subject": "math"},
    "humaneval/HumanEval.jsonl.gz": {"task_id": "HumanEval/0", "prompt": "def one():\n", "entry_point": "one",
                                     "canonical_solution": "    return 1\n",
                                     "test": "def check(f):\n    assert f() == 1\n"},
}


def test_a_local_copy_written_by_datasets_to_json_is_read_through_eval_data_dir(tmp_path):
    for name, record in RECORDS.items():
        Dataset.from_list([record]).to_json(str(tmp_path / name))  # makes the folders; .gz: gzip
    eval_cfg = EvalConfig(data_dir=str(tmp_path), few_shot=1)
    golds = {name: [(p.question, p.gold, p.grader) for p in load_benchmark(name, eval_cfg, DataConfig())]
             for name in ("gsm8k", "math500", "svamp", "mmlu_stem", "humaneval")}
    assert golds == {
        "gsm8k": [("Bo has 4 pens and loses 1. How many?", "3", "math")],
        "math500": [("What is $1+1$?", "2", "math")],
        "svamp": [("Tom has 7 cars. How many does he have?", "7", "math")],
        "mmlu_stem": [("2 x 3?", 1, "choice")],
        "humaneval": [("def one():\n", "", "code")],
    }
    assert few_shot_examples("gsm8k", eval_cfg)[0][0] == "Ann has 2 apples and buys 3. How many?"
    # The training split of the same copy is a data.source.
    assert load_records(str(tmp_path / "gsm8k" / "train.jsonl"), "train")[0]["answer"].endswith("#### 5")
