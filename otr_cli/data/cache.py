"""The tokenized-data cache: ``build_datasets``' result stored once, reused by every later start and rank.

An entry is keyed on everything the result depends on (``cache_key``):

- the records, hashed in order (blake2b over canonical JSON), as ``read_split`` returned them:
  content, not file names or mtimes, so an edited file misses and a touched one still hits;
  generated records (synthetic_arith) are keyed on their generator's code instead, since the
  settings in the key say which records it makes: a hit then needs no records at all;
- every ``data.*`` setting except ``FIELDS_NOT_IN_KEY`` (where the cache lives, whether it is on, how
  examples are batched),
  and the run's seed (shuffling and data.max_examples pick the examples by it);
- the tokenizer: class, serialized backend (vocabulary, merges, normalizer, added tokens), special
  tokens, the chat template actually used, and the transformers / tokenizers / jinja2 versions
  that render and encode;
- ``FORMAT_VERSION``: bump it whenever the encoding code (data/pipeline.py, chat.py, formats.py,
  weights.py) or the stored layout changes, so that old entries miss instead of being reused.

An entry is a directory ``<root>/<key>/`` holding, per split, the flat arrays of a TokenizedSplit as
``{split}.{array}.npy`` (int32 token ids, a uint8 supervised flag per token, int64 offsets and
supervised counts, and float32 weights where examples are weighted: data/tokenized.py) and
``meta.json`` (format version, key, what the key covers, the DataReport). Readers memory-map the
arrays, so loading takes milliseconds and the ranks of a node share one copy in the page cache.

While a first tokenization runs, finished chunks of it are kept in ``<root>/.<key>.partial/``
(data/shared_encoding.py): a run killed half-way starts again from what was done.

Writers build the entry in a uniquely named temporary sibling and rename it into place, so a killed
writer leaves a ``.tmp`` directory that no reader takes for an entry. An entry that cannot be read
is removed with a warning and rebuilt; a cache directory that cannot be written only costs a warning.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from otr_cli.atomic import fsync_directory
from otr_cli.data.examples import DataBundle, DataReport
from otr_cli.data.tokenized import TokenizedSplit

log = logging.getLogger(__name__)

FORMAT_VERSION = 4  # 4: alpaca and text formats, mixtures (data.sources); 3: a record with no reply is dropped
CACHE_DIR_ENV = "OTR_CACHE_DIR"
DEFAULT_CACHE_DIR = "~/.cache/otr/tokenized"
# DataConfig fields that cannot change the tokenized result: where the cache lives and whether it is used.
# Batching settings: they arrange the tokenized examples, never change them.
FIELDS_NOT_IN_KEY = frozenset({"cache", "cache_dir", "packing", "pack_length", "group_by_length"})
# DataReport fields that describe this lookup, not the data: never stored, set on every load.
REPORT_LOOKUP_FIELDS = ("cache", "cache_path")
META_FILE = "meta.json"
SPLITS = ("train", "validation")
STALE_TMP_SECONDS = 24 * 3600  # a writer's temporary directory older than this belongs to a dead writer


def cache_root(data_cfg: Any) -> Path:
    """Where entries live: data.cache_dir, else $OTR_CACHE_DIR, else ~/.cache/otr/tokenized."""
    configured = getattr(data_cfg, "cache_dir", None) or os.environ.get(CACHE_DIR_ENV) or DEFAULT_CACHE_DIR
    return Path(os.path.expandvars(configured)).expanduser()


def _plain(value: Any) -> Any:
    """A dataclass, DictConfig or mapping as plain JSON-able containers."""
    from omegaconf import DictConfig, ListConfig, OmegaConf

    if isinstance(value, (DictConfig, ListConfig)):
        return OmegaConf.to_container(value, resolve=True)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.asdict(value)
    if isinstance(value, Mapping):
        return {key: _plain(item) for key, item in value.items()}
    return value


def _canonical(value: Any) -> bytes:
    """Canonical JSON bytes: sorted keys, no spaces; values JSON cannot hold are written as type:str."""
    return json.dumps(value, sort_keys=True, ensure_ascii=False, separators=(",", ":"),
                      default=lambda item: f"{type(item).__name__}:{item}").encode("utf-8")


def data_settings(data_cfg: Any) -> dict[str, Any]:
    """Every data.* setting that can change the tokenized result (all but FIELDS_NOT_IN_KEY)."""
    settings = _plain(data_cfg)
    if not isinstance(settings, dict):
        raise TypeError(f"data settings must be a DataConfig, DictConfig or mapping, got {type(data_cfg).__name__}")
    return {key: value for key, value in settings.items() if key not in FIELDS_NOT_IN_KEY}


def records_digest(record_sets: Iterable[Optional[Iterable[Mapping]]]) -> str:
    """blake2b of the records of each set, in order (None: a set that is absent, e.g. no validation split)."""
    digest = hashlib.blake2b(digest_size=20)
    for records in record_sets:
        digest.update(b"\x00set\n" if records is not None else b"\x00none\n")
        for record in records or ():
            digest.update(_canonical(dict(record)))
            digest.update(b"\n")
    return digest.hexdigest()


def _version(package: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return "absent"


def tokenizer_fingerprint(tokenizer: Any, template: Optional[str]) -> dict[str, str]:
    """What of the tokenizer decides the token ids and labels, hashed where large.

    template: the chat template build_datasets renders with (None: the tokenizer's own).
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        serialized = backend.to_str()
    else:  # a slow (Python) tokenizer: its vocabulary is what we can see
        serialized = _canonical(sorted(tokenizer.get_vocab().items())).decode("utf-8")
    used_template = template if template is not None else getattr(tokenizer, "chat_template", None)
    return {
        "class": f"{type(tokenizer).__module__}.{type(tokenizer).__qualname__}",
        "backend": hashlib.blake2b(serialized.encode("utf-8"), digest_size=20).hexdigest(),
        "chat_template": hashlib.blake2b(_canonical(used_template), digest_size=20).hexdigest(),
        "special_tokens": _canonical(_plain(getattr(tokenizer, "special_tokens_map", {}))).decode("utf-8"),
        "versions": f"transformers {_version('transformers')}, tokenizers {_version('tokenizers')}, "
                    f"jinja2 {_version('jinja2')}",
        "name": str(getattr(tokenizer, "name_or_path", "")),  # for people reading meta.json; not in the key
    }


def generated_records_digest(data_cfg: Any) -> Optional[str]:
    """For records that a generator makes from the data settings (data.source=synthetic_arith): a hash of the
    generator's code, so that a key needs neither the records nor the time to generate them (the settings,
    in the key already, say which records). None for records read from a file or the hub."""
    from otr_cli.data import synthetic_arith
    from otr_cli.data.sources import SYNTHETIC_SOURCE

    if getattr(data_cfg, "source", None) != SYNTHETIC_SOURCE or getattr(data_cfg, "sources", None):
        return None  # a mixture (data.sources) is keyed on its records, whatever data.source says
    code = hashlib.blake2b(Path(synthetic_arith.__file__).read_bytes(), digest_size=20).hexdigest()
    # random.Random's draws may change between Python versions: the interpreter is part of the generator
    return f"generator:python{sys.version_info[0]}.{sys.version_info[1]}:{code}"


def cache_key(data_cfg: Any, tokenizer: Any, template: Optional[str], seed: int,
              record_sets: Optional[Iterable[Optional[Iterable[Mapping]]]]) -> tuple[str, dict[str, Any]]:
    """(hex key, the inputs it hashes) of build_datasets(data_cfg, tokenizer, seed) on these records
    (None: generated records, keyed on their generator: generated_records_digest)."""
    fingerprint = tokenizer_fingerprint(tokenizer, template)
    records = generated_records_digest(data_cfg) if record_sets is None else records_digest(record_sets)
    if records is None:
        raise ValueError("records are needed to key data that is not generated")
    inputs = {
        "format_version": FORMAT_VERSION,
        "data": data_settings(data_cfg),
        "seed": seed,
        "records": records,
        "tokenizer": {key: value for key, value in fingerprint.items() if key != "name"},
    }
    key = hashlib.blake2b(_canonical(inputs), digest_size=20).hexdigest()
    return key, {**inputs, "tokenizer": fingerprint}


def _stored_report(report: DataReport) -> dict[str, Any]:
    stored = report.as_dict()
    for name in REPORT_LOOKUP_FIELDS:
        stored.pop(name, None)
    return stored


@dataclass
class CacheEntry:
    """One key's place in the cache: ``path`` = ``<root>/<key>``; ``inputs`` = what the key hashes (meta.json)."""

    path: Path
    key: str
    inputs: dict[str, Any]

    @property
    def partial_dir(self) -> Path:
        """Where a first tokenization keeps its finished chunks until the entry is stored (data/shared_encoding.py)."""
        return self.path.with_name(f".{self.key}.partial")

    def load(self) -> Optional[DataBundle]:
        """The stored bundle (report.cache "hit"), or None when there is none or it is unreadable (then it is
        removed, with a warning, so that the caller's rebuild can store a good one)."""
        if not self.path.is_dir():
            return None
        try:
            return self._read()
        except Exception as exc:  # truncated file, bad JSON, wrong layout: all mean "rebuild it"
            log.warning("data: tokenized cache entry %s is unreadable (%s: %s); tokenizing again and replacing it",
                        self.path, type(exc).__name__, exc)
            self._discard()
            return None

    def read_published(self, wait_s: float = 120.0) -> DataBundle:
        """The entry another rank just stored (or found), retried for up to `wait_s` while a shared file system
        does not show it yet. Never removes it: only the rank that decided to use it may judge it broken."""
        deadline = time.monotonic() + wait_s
        while True:
            try:
                return self._read()
            except Exception as exc:
                if time.monotonic() > deadline:
                    from otr_cli.data.errors import DataError

                    raise DataError(f"the tokenized cache entry {self.path} that rank 0 stored cannot be read here "
                                    f"after {wait_s:.0f} s ({type(exc).__name__}: {exc}); is data.cache_dir on a "
                                    f"file system every node shares?") from exc
                time.sleep(1.0)

    def _read(self) -> DataBundle:
        meta = json.loads((self.path / META_FILE).read_text(encoding="utf-8"))
        if meta.get("format_version") != FORMAT_VERSION or meta.get("key") != self.key:
            raise ValueError(f"{META_FILE} is for format {meta.get('format_version')} key {meta.get('key')}")
        report_fields = {f.name for f in dataclasses.fields(DataReport)} - set(REPORT_LOOKUP_FIELDS)
        if set(meta["report"]) != report_fields:
            raise ValueError(f"its report has fields {sorted(set(meta['report']) ^ report_fields)} that this "
                             f"version's DataReport does not (or the reverse)")
        splits = {}
        for split in SPLITS:
            splits[split] = TokenizedSplit.load(self.path, split)
            expected = meta["examples"][split], meta["tokens"][split]
            if (len(splits[split]), splits[split].num_tokens) != tuple(expected):
                raise ValueError(f"{split}: {len(splits[split])} examples and {splits[split].num_tokens} tokens "
                                 f"stored, {expected[0]} and {expected[1]} expected")
        # Entries stored before digests were kept have none: the fingerprint then reads the arrays.
        splits["train"].stored_digest = meta.get("digests", {}).get("train")
        bundle = DataBundle(train=splits["train"], validation=splits["validation"],
                            report=DataReport(**meta["report"]))
        bundle.report.cache, bundle.report.cache_path = "hit", str(self.path)
        return bundle

    def store(self, bundle: DataBundle) -> bool:
        """Write the bundle as this entry, atomically; False (and a warning) when the cache cannot be written.

        Another process storing the same key first is fine: both wrote the same data, the first rename wins.
        """
        root = self.path.parent
        tmp: Optional[Path] = None
        try:
            root.mkdir(parents=True, exist_ok=True)
            _remove_stale_tmp(root)
            tmp = Path(tempfile.mkdtemp(prefix=f".{self.key}.", suffix=".tmp", dir=root))
            os.chmod(tmp, 0o755)  # mkdtemp's 0700 would hide a shared cache_dir's entries from teammates
            written = []
            splits = {split: as_split(getattr(bundle, split)) for split in SPLITS}
            for split, tokenized in splits.items():
                written += tokenized.save(tmp, split)
            # The training split's digest, the run's data fingerprint (train/data_identity.py): hashed once here,
            # so that no later start reads every token on rank 0 while the other ranks wait.
            train_digest = splits["train"].stored_digest or splits["train"].content_digest()
            meta = {"format_version": FORMAT_VERSION, "key": self.key, "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
                    "inputs": self.inputs, "digests": {"train": train_digest},
                    "examples": {split: len(splits[split]) for split in SPLITS},
                    "tokens": {split: splits[split].num_tokens for split in SPLITS},
                    "report": _stored_report(bundle.report)}
            (tmp / META_FILE).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
            for path in [*written, tmp / META_FILE]:
                _fsync_file(path)
            fsync_directory(tmp)
            os.rename(tmp, self.path)  # atomic; fails if the entry exists (another writer was first)
            fsync_directory(root)
            if isinstance(bundle.train, TokenizedSplit):
                bundle.train.stored_digest = train_digest
            return True
        except OSError as exc:
            if tmp is not None:
                shutil.rmtree(tmp, ignore_errors=True)
            if self.path.is_dir():
                return True  # another rank or job stored this key while we were writing
            log.warning("data: could not write the tokenized cache in %s (%s); training goes on, the next start "
                        "tokenizes again. Set data.cache_dir (or $%s) to a writable directory, or data.cache=false",
                        root, exc, CACHE_DIR_ENV)
            return False

    def _discard(self) -> None:
        """Move the entry out of the way first (atomic), so no reader sees a half-deleted one, then delete it."""
        doomed = self.path.with_name(f".{self.key}.{os.getpid()}.discard.tmp")
        try:
            os.rename(self.path, doomed)
        except OSError:
            return  # another process removed or replaced it already
        shutil.rmtree(doomed, ignore_errors=True)


def as_split(examples) -> TokenizedSplit:
    """A TokenizedSplit as it is, or a list of TokenizedExample flattened into one."""
    return examples if isinstance(examples, TokenizedSplit) else TokenizedSplit.from_examples(examples)


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def _remove_stale_tmp(root: Path) -> None:
    """Delete temporary directories left by writers that died more than STALE_TMP_SECONDS ago."""
    cutoff = time.time() - STALE_TMP_SECONDS
    for child in root.glob(".*.tmp"):
        try:
            if child.stat().st_mtime < cutoff:
                shutil.rmtree(child, ignore_errors=True)
        except OSError:
            continue


def cache_entry(data_cfg: Any, tokenizer: Any, template: Optional[str], seed: int,
                record_sets: Optional[Iterable[Optional[Iterable[Mapping]]]]) -> Optional[CacheEntry]:
    """The entry for build_datasets(data_cfg, tokenizer, seed) on these records (None: generated records);
    None when data.cache is false."""
    if not getattr(data_cfg, "cache", True):
        return None
    key, inputs = cache_key(data_cfg, tokenizer, template, seed, record_sets)
    return CacheEntry(cache_root(data_cfg) / key, key, inputs)
