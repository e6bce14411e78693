"""One rank of a data-building test: `_build_data_once` in a real gloo process group (tests/ranks.py starts
it with the rendezvous variables set). Writes <out>/rank<R>.json with what the rank built and did."""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path


def main(settings_file: str, out_dir: str) -> None:
    settings = json.loads(Path(settings_file).read_text())
    from otr_cli.config import DataConfig, TrainConfig
    from otr_cli.data import pipeline, shared_encoding
    from otr_cli.models import load_tokenizer
    from otr_cli.train import loop
    from otr_cli.train.distributed import init_distributed

    calls = {"encodes": 0, "reads": 0}
    encode, read = pipeline.encode_conversation, pipeline.read_split

    def counting_encode(*args, **kwargs):
        calls["encodes"] += 1
        if calls["encodes"] == settings.get("die_after_encodes"):
            import os
            os._exit(9)  # a kill: no cleanup, no exception handler runs
        return encode(*args, **kwargs)

    def counting_read(*args, **kwargs):
        calls["reads"] += 1
        return read(*args, **kwargs)

    pipeline.encode_conversation, pipeline.read_split = counting_encode, counting_read
    shared_encoding.CHUNK_RECORDS = settings.get("chunk_records", shared_encoding.CHUNK_RECORDS)
    dist_info = init_distributed(settings.get("dist_timeout_min", 2.0))
    cfg = TrainConfig()
    cfg.data, cfg.seed = DataConfig(**settings["data"]), 1
    tokenizer = load_tokenizer("smollm2-135m-instruct")
    try:
        bundle = loop._build_data_once(cfg, tokenizer, dist_info)
        digest = hashlib.blake2b(digest_size=16)
        for array in bundle.train.arrays().values():
            digest.update(array.tobytes())
        result = {"cache": bundle.report.cache, "train_digest": digest.hexdigest(), "train": len(bundle.train),
                  "validation": len(bundle.validation), "report": bundle.report.as_dict(), **calls}
    except Exception as exc:  # reported to the test
        result = {"error": f"{type(exc).__name__}: {exc}", **calls}
    (Path(out_dir) / f"rank{dist_info.rank}.json").write_text(json.dumps(result))


if __name__ == "__main__":
    main(*sys.argv[1:3])
