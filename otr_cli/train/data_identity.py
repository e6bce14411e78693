"""What a run trained on, recorded in each checkpoint so that a resume on other data is noticed.

A resume is exact only on the same tokenized examples: the order of examples is a pure function of the
seed and the step (train/batches.py), so an edited training file resumes silently into other batches.
``train_data_fingerprint`` hashes the tokenized training split itself (the token ids, label flags, example
boundaries and loss weights that training reads), whichever way it was built (tokenized now, read from the
tokenization cache, or generated); otr_state.json keeps it with the source it came from
(train/checkpoints.py check_same_training_data).
"""

from __future__ import annotations

from typing import Any


def train_data_fingerprint(train_split, data_cfg: Any) -> dict[str, Any]:
    """{"train_tokens": hex blake2b of the tokenized training split, "examples": their count,
    "source": where the records came from, as data.* says it}.

    train_split: a TokenizedSplit (data/tokenized.py). Its digest is the one the tokenization cache stored with
    the arrays when it has one (a cache hit: nothing to read); otherwise its arrays are read once (~1 s per GB
    on one core, on rank 0 while the others wait), which happens once per cache entry.
    """
    train_tokens = getattr(train_split, "stored_digest", None) or train_split.content_digest()
    return {"train_tokens": train_tokens, "examples": len(train_split), "source": data_source(data_cfg)}


def data_source(data_cfg: Any) -> str:
    """data.source as a user reads it, with the hub subset and split where they matter; a mixture's sources."""
    from otr_cli.config import source_entries

    entries = source_entries(data_cfg)
    if entries:
        from otr_cli.data.mixture import describe_entry

        return "mixture of " + ", ".join(describe_entry(entry) for entry in entries)
    source = str(data_cfg.source)
    parts = [f"subset {data_cfg.subset}"] if getattr(data_cfg, "subset", None) else []
    if getattr(data_cfg, "split", "train") != "train":
        parts.append(f"split {data_cfg.split}")
    return f"{source} ({', '.join(parts)})" if parts else source
