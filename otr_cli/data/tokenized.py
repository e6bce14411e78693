"""A split of tokenized examples held as flat arrays: the form training reads, the cache stores and every rank
of a node maps from the same file.

Python lists of ints cost about 39 bytes per token in every rank (measured: 836 MiB for 22.3M tokens);
a ``TokenizedSplit`` holds 5 bytes per token (int32 ids and a uint8 supervised flag; 4 more where a data
set carries loss weights), and when it is loaded from the tokenized-data cache the arrays are
memory-mapped, so the ranks of a node share one copy in the page cache. Examples are built as
``TokenizedExample`` (plain lists) only when a micro-batch asks for them.

Labels are not stored: ``labels[t]`` is ``input_ids[t]`` where the token is supervised and IGNORE_INDEX
elsewhere (the contract of TokenizedExample), so one flag per token holds them.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Optional, Union, overload

import numpy as np

from otr_cli.data.examples import IGNORE_INDEX, TokenizedExample

# The arrays of a split, with their dtypes; "weights" and "has_weights" only when an example is weighted.
ARRAY_DTYPES = {"input_ids": np.int32, "supervised": np.uint8, "offsets": np.int64, "num_supervised": np.int64,
                "weights": np.float32, "has_weights": np.uint8}
REQUIRED_ARRAYS = ("input_ids", "supervised", "offsets", "num_supervised")
# content_digest() hashes this many bytes at a time.
DIGEST_CHUNK_BYTES = 64 << 20


class TokenizedSplit(Sequence):
    """N examples as flat arrays; ``split[i]`` is a TokenizedExample, ``split[a:b]`` a list of them.

    input_ids: [total tokens] int32, the examples one after another.
    supervised: [total tokens] uint8, 1 where the token's label is the token itself.
    offsets: [N + 1] int64, example i is tokens offsets[i]:offsets[i+1].
    num_supervised: [N] int64, each example's supervised positions after its first token
        (TokenizedExample.num_supervised).
    weights: None, or [total tokens] float32 loss weights, read for the examples whose has_weights [N]
        uint8 is 1 (the others weigh 1 everywhere).
    """

    def __init__(self, input_ids: np.ndarray, supervised: np.ndarray, offsets: np.ndarray,
                 num_supervised: np.ndarray, weights: Optional[np.ndarray] = None,
                 has_weights: Optional[np.ndarray] = None):
        total = int(offsets[-1]) if len(offsets) else 0
        if len(offsets) == 0 or int(offsets[0]) != 0 or len(input_ids) != total or len(supervised) != total:
            raise ValueError(f"{len(input_ids)} token ids / {len(supervised)} flags for offsets ending at {total}")
        if len(num_supervised) != len(offsets) - 1:
            raise ValueError(f"{len(num_supervised)} supervised counts for {len(offsets) - 1} examples")
        if (weights is None) != (has_weights is None) or (
                weights is not None and (len(weights) != total or len(has_weights) != len(num_supervised))):
            raise ValueError("weights do not match the examples")
        self.input_ids, self.supervised, self.offsets = input_ids, supervised, offsets
        self.num_supervised, self.weights, self.has_weights = num_supervised, weights, has_weights
        # content_digest() as the tokenization cache stored it with these arrays (None: not known).
        self.stored_digest: Optional[str] = None

    # -- building -------------------------------------------------------------------------------
    @classmethod
    def from_examples(cls, examples: Sequence[TokenizedExample]) -> "TokenizedSplit":
        """Flatten examples; raises ValueError when a label is neither its token nor IGNORE_INDEX."""
        lengths = np.fromiter((len(example.input_ids) for example in examples), dtype=np.int64, count=len(examples))
        offsets = np.zeros(len(examples) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        total = int(offsets[-1])
        input_ids = np.fromiter((t for e in examples for t in e.input_ids), dtype=np.int64, count=total)
        labels = np.fromiter((t for e in examples for t in e.labels), dtype=np.int64, count=total)
        supervised = labels != IGNORE_INDEX
        if not np.array_equal(labels[supervised], input_ids[supervised]):
            bad = int(np.flatnonzero(supervised & (labels != input_ids))[0])
            raise ValueError(f"token {bad}: label {labels[bad]} is neither the token {input_ids[bad]} nor "
                             f"{IGNORE_INDEX}; a TokenizedSplit cannot hold it")
        weights = has_weights = None
        if any(example.weights is not None for example in examples):
            has_weights = np.fromiter((e.weights is not None for e in examples), dtype=np.uint8, count=len(examples))
            weights = np.fromiter((w for e in examples for w in (e.weights if e.weights is not None
                                                                 else [1.0] * len(e.input_ids))),
                                  dtype=np.float32, count=total)
        num_supervised = np.fromiter((e.num_supervised for e in examples), dtype=np.int64, count=len(examples))
        return cls(input_ids.astype(np.int32), supervised.astype(np.uint8), offsets, num_supervised,
                   weights, has_weights)

    @classmethod
    def concatenate(cls, parts: Sequence["TokenizedSplit"]) -> "TokenizedSplit":
        """The examples of `parts`, in order, as one split."""
        if not parts:
            return cls.from_examples([])
        ends = np.cumsum([int(part.offsets[-1]) for part in parts])
        shifts = np.concatenate([[0], ends[:-1]])
        offsets = np.concatenate([[0]] + [part.offsets[1:] + shift for part, shift in zip(parts, shifts)])
        weighted = any(part.weights is not None for part in parts)
        weights = has_weights = None
        if weighted:
            weights = np.concatenate([part.weights if part.weights is not None
                                      else np.ones(len(part.input_ids), dtype=np.float32) for part in parts])
            has_weights = np.concatenate([part.has_weights if part.has_weights is not None
                                          else np.zeros(len(part), dtype=np.uint8) for part in parts])
        return cls(np.concatenate([part.input_ids for part in parts]).astype(np.int32),
                   np.concatenate([part.supervised for part in parts]).astype(np.uint8),
                   offsets.astype(np.int64), np.concatenate([part.num_supervised for part in parts]).astype(np.int64),
                   weights, has_weights)

    # -- storage --------------------------------------------------------------------------------
    def arrays(self) -> dict[str, np.ndarray]:
        """The arrays by name (ARRAY_DTYPES), without the weight arrays when nothing is weighted."""
        named = {"input_ids": self.input_ids, "supervised": self.supervised, "offsets": self.offsets,
                 "num_supervised": self.num_supervised}
        if self.weights is not None:
            named.update(weights=self.weights, has_weights=self.has_weights)
        return named

    def content_digest(self) -> str:
        """Hex blake2b (20 bytes) of every array (name, dtype, length, bytes), read DIGEST_CHUNK_BYTES at a
        time: a memory-mapped split of any size is read page by page, never copied whole (~1 s per GB)."""
        digest = hashlib.blake2b(digest_size=20)
        for name, array in self.arrays().items():
            flat = np.ascontiguousarray(array).reshape(-1)
            digest.update(f"{name}:{flat.dtype.str}:{flat.size}\n".encode())
            step = max(1, DIGEST_CHUNK_BYTES // max(flat.itemsize, 1))
            for start in range(0, flat.size, step):
                digest.update(memoryview(flat[start:start + step]).cast("B"))
        return digest.hexdigest()

    def save(self, directory: Path, prefix: str) -> list[Path]:
        """One ``{prefix}.{name}.npy`` per array in `directory`; returns the paths written."""
        written = []
        for name, array in self.arrays().items():
            path = directory / f"{prefix}.{name}.npy"
            np.save(path, np.ascontiguousarray(array, dtype=ARRAY_DTYPES[name]), allow_pickle=False)
            written.append(path)
        return written

    @classmethod
    def load(cls, directory: Path, prefix: str, mmap: bool = True) -> "TokenizedSplit":
        """The split ``save`` wrote; memory-mapped read-only by default (pages shared by every process)."""
        mode = "r" if mmap else None
        named = {}
        for name, dtype in ARRAY_DTYPES.items():
            path = directory / f"{prefix}.{name}.npy"
            if name in REQUIRED_ARRAYS or path.exists():
                array = np.load(path, mmap_mode=mode, allow_pickle=False)
                if array.dtype != dtype or array.ndim != 1:
                    raise ValueError(f"{path.name} holds {array.dtype} [{array.shape}], expected 1-D {np.dtype(dtype)}")
                named[name] = array
        return cls(**named)

    # -- reading --------------------------------------------------------------------------------
    @property
    def lengths(self) -> np.ndarray:
        """[N] int64 tokens of each example."""
        return np.diff(self.offsets)

    @property
    def num_tokens(self) -> int:
        return int(self.offsets[-1])

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def example(self, index: int) -> TokenizedExample:
        start, end = int(self.offsets[index]), int(self.offsets[index + 1])
        ids = self.input_ids[start:end].astype(np.int64)
        labels = np.where(self.supervised[start:end] != 0, ids, IGNORE_INDEX)
        weights = None
        if self.has_weights is not None and self.has_weights[index]:
            weights = self.weights[start:end].astype(np.float64).tolist()
        return TokenizedExample(ids.tolist(), labels.tolist(), weights)

    @overload
    def __getitem__(self, index: int) -> TokenizedExample: ...

    @overload
    def __getitem__(self, index: slice) -> list[TokenizedExample]: ...

    def __getitem__(self, index: Union[int, slice]):
        if isinstance(index, slice):
            return [self.example(i) for i in range(*index.indices(len(self)))]
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(f"example {index} of {len(self)}")
        return self.example(index)

    def __eq__(self, other: object) -> bool:
        """Same examples: a TokenizedSplit with equal arrays, or a sequence of equal TokenizedExamples."""
        if isinstance(other, TokenizedSplit):
            mine, theirs = self.arrays(), other.arrays()
            return mine.keys() == theirs.keys() and all(np.array_equal(mine[k], theirs[k]) for k in mine)
        if isinstance(other, Sequence) and not isinstance(other, (str, bytes)):
            return len(other) == len(self) and all(a == b for a, b in zip(self, other))
        return NotImplemented

    __hash__ = None  # mutable arrays: unhashable, like a list

    def __iter__(self) -> Iterator[TokenizedExample]:
        return (self.example(i) for i in range(len(self)))
