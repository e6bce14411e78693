"""Read raw records (dicts) from a source: a hub id, a local file or directory, or synthetic_arith.

Local files: ``.jsonl`` (one JSON object per line), ``.json`` (a list of objects, or an object
holding one such list), ``.parquet``, ``.csv`` / ``.tsv`` (a header row naming the fields, read
by the ``datasets`` library's csv loader, every cell as text); ``.jsonl.gz`` / ``.json.gz`` too. A directory holds one
file per split (``train.jsonl``, ``test.jsonl``, or the hub layout ``data/train-00000-of-00001.parquet``):
the files whose name matches the split are read. Anything that is not an existing path, has no
data-file extension and does not start with ``.``, ``/`` or ``~`` is a hub id for
``datasets.load_dataset(source, subset, split=split)``.

Every record keeps where it came from (``RecordSet.where``) so that errors can say
``train.jsonl:17`` instead of "record 16".
"""

from __future__ import annotations

import bisect
import csv
import gzip
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

from otr_cli.config import DataConfig, SyntheticArithConfig
from otr_cli.data.errors import DataError

SYNTHETIC_SOURCE = "synthetic_arith"
DATA_SUFFIXES = (".jsonl", ".json", ".parquet", ".csv", ".tsv", ".jsonl.gz", ".json.gz")
DELIMITED_SUFFIXES = {".csv": ",", ".tsv": "\t"}


@dataclass
class _Segment:
    """Records [start, start + count) of a RecordSet came from `label`; `lines` are 1-based."""

    start: int
    label: str
    lines: Optional[list[int]] = None  # JSON lines: the line number of each record


@dataclass
class RecordSet:
    """Raw records of one split plus their provenance.

    records: a list of dicts, or a ``datasets.Dataset`` (indexable, yields dicts) for hub data,
        so a large hub split is not converted to Python objects up front.
    description: the source in words, e.g. "openai/gsm8k (subset main, split train)".
    """

    records: Sequence[dict]
    description: str
    segments: list[_Segment] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict:
        return self.records[index]

    def where(self, index: int) -> str:
        """Human-readable location of record `index`: ``file:line``, ``file record i`` or ``source row i``."""
        if not self.segments:
            return f"{self.description} row {index}"
        starts = [segment.start for segment in self.segments]
        segment = self.segments[bisect.bisect_right(starts, index) - 1]
        local = index - segment.start
        if segment.lines is not None:
            return f"{segment.label}:{segment.lines[local]}"
        return f"{segment.label} record {local}"


def _open_binary(path: Path):
    return gzip.open(path, "rb") if path.name.endswith(".gz") else open(path, "rb")


def _decode(raw: bytes, path: Path, line: int, line_offset: int) -> str:
    """UTF-8 text of `raw` (line `line`, starting at byte `line_offset` of the file), or a DataError saying where."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        byte = raw[exc.start : exc.start + 1].hex()
        raise DataError(f"{path}:{line}: not UTF-8 text: byte 0x{byte} at byte {line_offset + exc.start} of the file "
                        f"(column {exc.start + 1} of the line); save the file as UTF-8 "
                        f"(e.g. `iconv -f latin1 -t utf-8 {path.name}`)") from exc


def _text_lines(path: Path):
    """(line number from 1, decoded line) of a text file, gzipped or not; non-UTF-8 bytes are a DataError."""
    offset = 0
    with _open_binary(path) as handle:
        for number, raw in enumerate(handle, start=1):
            text = _decode(raw, path, number, offset)
            # A byte-order mark (files saved by some Windows editors) is not part of the first record.
            yield number, text[1:] if number == 1 and text.startswith("\ufeff") else text
            offset += len(raw)


def _read_jsonl(path: Path) -> tuple[list[dict], list[int]]:
    records: list[dict] = []
    line_numbers: list[int] = []
    for number, line in _text_lines(path):
        if not line.strip():
            continue  # blank lines (a trailing newline, say) are not records
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}:{number}: malformed JSON line ({exc.msg} at column {exc.colno}); "
                            f"fix or remove that line") from exc
        if not isinstance(record, dict):
            raise DataError(f"{path}:{number}: expected a JSON object per line, got {type(record).__name__}")
        records.append(record)
        line_numbers.append(number)
    return records, line_numbers


def _read_json(path: Path) -> list[dict]:
    text = "".join(line for _, line in _text_lines(path))
    try:
        payload = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}: malformed JSON ({exc.msg} at line {exc.lineno}, column {exc.colno}); "
                        f"a file of one object per line should be named .jsonl") from exc
    if isinstance(payload, dict):
        # {"data": [...]} and similar wrappers: accept exactly one list of records inside.
        lists = [value for value in payload.values() if isinstance(value, list)]
        if len(lists) != 1:
            raise DataError(f"{path}: expected a JSON list of records (or an object holding one list), "
                            f"got an object with keys {sorted(payload)}")
        payload = lists[0]
    if not isinstance(payload, list):
        raise DataError(f"{path}: expected a JSON list of records, got {type(payload).__name__}")
    for index, record in enumerate(payload):
        if not isinstance(record, dict):
            raise DataError(f"{path} record {index}: expected a JSON object, got {type(record).__name__}")
    return payload


def _read_parquet(path: Path) -> list[dict]:
    import pyarrow.parquet as pq  # a dependency of `datasets`

    try:
        return pq.read_table(path).to_pylist()
    except Exception as exc:  # pyarrow raises several types; all mean "not a readable parquet file"
        raise DataError(f"{path}: cannot read as parquet ({exc})") from exc


def _record_start_lines(path: Path, delimiter: str) -> list[int]:
    """1-based line on which each data row of a CSV/TSV file starts (the header is line 1).

    A quoted cell may hold newlines, so a row's line is not its index + 2; blank lines are not
    rows (the csv loader skips them too).
    """
    starts: list[int] = []
    with path.open(newline="", encoding="utf-8") as handle:
        reader = csv.reader(handle, delimiter=delimiter)
        next(reader, None)
        previous_end = reader.line_num
        for row in reader:
            if row:
                starts.append(previous_end + 1)
            previous_end = reader.line_num
    return starts


def _check_row_widths(path: Path, delimiter: str, header: list[str]) -> None:
    """A row with more cells than the header is an error: pandas would silently make the first column the index
    when every row has one more cell, shifting every value one field to the right."""
    with path.open(newline="", encoding="utf-8") as handle:
        reader = csv.reader(handle, delimiter=delimiter)
        next(reader, None)
        previous_end = reader.line_num
        for row in reader:
            if len(row) > len(header):
                raise DataError(f"{path}:{previous_end + 1}: cannot read as {path.suffix[1:].upper()} ({len(row)} "
                                f"cells, the header has {len(header)}: {', '.join(header)}); every row needs as many "
                                f"cells as the header, and a cell holding the delimiter or a newline must be quoted")
            previous_end = reader.line_num


def _read_delimited(path: Path) -> tuple[list[dict], Optional[list[int]]]:
    """Records of a .csv/.tsv file through ``datasets``' csv loader, every cell as text, and their lines.

    Cells stay text (string features, no NaN conversion): type inference would turn an answer "007"
    into 7 or an empty cell into NaN. Numeric fields (data.weight_field) are parsed where used.
    """
    import datasets

    delimiter = DELIMITED_SUFFIXES[path.suffix]
    try:
        for _ in _text_lines(path):  # non-UTF-8 bytes: the same file:line error as for JSON lines
            pass
        with path.open(newline="", encoding="utf-8-sig") as handle:
            header = next(csv.reader(handle, delimiter=delimiter), [])
        if not header or not _record_start_lines(path, delimiter):
            return [], []  # no header or no row: "has no records" (the loader's own error names neither)
        _check_row_widths(path, delimiter, header)
        # Declared string features make the loader read every column with a text dtype.
        features = datasets.Features({name: datasets.Value("string") for name in header})
        dataset = datasets.load_dataset("csv", data_files=str(path), split="train", delimiter=delimiter,
                                        features=features, keep_default_na=False)
    except DataError:
        raise
    except Exception as exc:  # pandas' ParserError, wrapped by datasets: its message names the line
        cause = exc
        while cause.__cause__ is not None and "line" not in str(cause):
            cause = cause.__cause__
        line = re.search(r"line (\d+)", str(cause))
        where = f"{path}:{line.group(1)}" if line else str(path)
        raise DataError(f"{where}: cannot read as {path.suffix[1:].upper()} ({cause}); every row needs as many "
                        f"cells as the header, and a cell holding the delimiter or a newline must be quoted") from exc
    records = dataset.to_list()
    lines = _record_start_lines(path, delimiter)
    return records, (lines if len(lines) == len(records) else None)


def _read_file(path: Path, records: list[dict], segments: list[_Segment]) -> None:
    """Append the records of one local file and their provenance."""
    start = len(records)
    name = path.name
    if name.endswith((".jsonl", ".jsonl.gz")):
        file_records, lines = _read_jsonl(path)
        segments.append(_Segment(start, str(path), lines))
    elif name.endswith((".json", ".json.gz")):
        file_records = _read_json(path)
        segments.append(_Segment(start, str(path)))
    elif name.endswith(".parquet"):
        file_records = _read_parquet(path)
        segments.append(_Segment(start, str(path)))
    elif path.suffix in DELIMITED_SUFFIXES:
        file_records, lines = _read_delimited(path)
        segments.append(_Segment(start, str(path), lines))
    else:
        raise DataError(f"data.source file {path} has an unsupported type; use one of {', '.join(DATA_SUFFIXES)}")
    records.extend(file_records)


def _split_files(directory: Path, split: str) -> list[Path]:
    """Data files of `split` in `directory` (recursively): exact stem first, then a name part."""
    files = sorted(p for p in directory.rglob("*") if p.is_file() and p.name.endswith(DATA_SUFFIXES))
    if not files:
        raise DataError(f"data.source directory {directory} holds no {', '.join(DATA_SUFFIXES)} files")

    def stem(path: Path) -> str:
        return re.sub(r"(\.jsonl|\.json|\.parquet|\.csv|\.tsv)(\.gz)?$", "", path.name)

    exact = [p for p in files if stem(p) == split]
    if exact:
        return exact
    # "train-00000-of-00001", "gsm8k_train": the split is one dash/underscore-separated part.
    partial = [p for p in files if split in re.split(r"[-_.]", stem(p))]
    if partial:
        return partial
    names = ", ".join(str(p.relative_to(directory)) for p in files)
    raise DataError(f"data.source directory {directory} has no file for split {split!r} (files: {names}); "
                    f"set data.split / data.validation_split to a file's name, or point data.source at one file")


def is_local_path(source: str) -> bool:
    """Whether `source` names a local file or directory (existing or clearly meant as a path)."""
    if Path(source).expanduser().exists():
        return True
    return source.startswith((".", "/", "~")) or source.endswith(DATA_SUFFIXES)


def _read_local(source: str, split: str) -> RecordSet:
    path = Path(source).expanduser()
    if not path.exists():
        raise DataError(f"data.source={source!r}: no such file or directory (relative paths start from the "
                        f"directory you run `otr` in: {Path.cwd()})")
    records: list[dict] = []
    segments: list[_Segment] = []
    if path.is_dir():
        for file in _split_files(path, split):
            _read_file(file, records, segments)
        return RecordSet(records, f"{path} (split {split})", segments)
    _read_file(path, records, segments)
    return RecordSet(records, str(path), segments)


def _read_hub(source: str, subset: Optional[str], split: str) -> RecordSet:
    import datasets  # heavy import, only needed for hub ids

    description = f"{source} ({f'subset {subset}, ' if subset else ''}split {split})"
    try:
        dataset = datasets.load_dataset(source, subset, split=split)
    except Exception as exc:  # network, missing subset/split, unknown repo: all reported the same way
        raise DataError(f"cannot load hub dataset data.source={source!r} with data.subset={subset!r}, split "
                        f"{split!r}: {exc}. For a local file give an existing path (.jsonl/.json/.parquet/.csv/.tsv).") from exc
    return RecordSet(dataset, description)


def _read_synthetic(synthetic: SyntheticArithConfig, split: str) -> RecordSet:
    from otr_cli.data.synthetic_arith import generate_split

    return RecordSet(generate_split(synthetic, split), f"{SYNTHETIC_SOURCE} (split {split})")


def read_source(source: str, split: str, *, subset: Optional[str] = None,
                synthetic: Optional[SyntheticArithConfig] = None) -> RecordSet:
    """Records of `split` from `source` with their provenance.

    For a single local file the split is ignored (the file is the split); for a directory it
    picks the file(s); for a hub id it is passed to ``datasets.load_dataset``.
    """
    if source == SYNTHETIC_SOURCE:
        return _read_synthetic(synthetic or SyntheticArithConfig(), split)
    if is_local_path(source):
        return _read_local(source, split)
    return _read_hub(source, subset, split)


def read_split(data_cfg: DataConfig, split: str) -> RecordSet:
    """Records of `split` of data.source; a split other than data.split may be a file path of its own."""
    if split != data_cfg.split and data_cfg.source != SYNTHETIC_SOURCE:
        if Path(split).expanduser().is_file():
            return _read_local(split, split)
        if Path(data_cfg.source).expanduser().is_file():
            # A single file is one split: reading it again would validate on the training data.
            raise DataError(f"data.source={data_cfg.source!r} is a single file, so split {split!r} cannot be "
                            f"picked from it; set data.validation_split to a file path or use "
                            f"data.validation_size to hold out part of the file")
    return read_source(data_cfg.source, split, subset=data_cfg.subset, synthetic=data_cfg.synthetic)


def load_records(source: str | DataConfig | Any, split: Optional[str] = None, *, subset: Optional[str] = None,
                 synthetic: Optional[SyntheticArithConfig] = None) -> list[dict]:
    """Raw records as a list of dicts, for evaluation and inspection.

    source: a source string (hub id, local path, "synthetic_arith") or a ``DataConfig`` (then
        subset and synthetic settings come from it and `split` defaults to data.split).
    split: e.g. "train", "test", "test_ood"; defaults to "train" for a source string.
    """
    if not isinstance(source, str):
        return [dict(record) for record in read_split(source, split or source.split)]
    return [dict(record) for record in read_source(source, split or "train", subset=subset, synthetic=synthetic)]
