"""What a checkpoint held when it was saved, and whether it still does: its ``manifest.json``.

    manifest.json   {"format": 1, "algorithm": "xxh3_64", "chunk_bytes": 268435456,
                     "files": {"ds/mp_rank_00_model_states.pt": {"size": 1234, "chunks": ["9f0c...", ...]},
                               "trainer_state.json": {"check": "json"}, ...}}

Every file of the checkpoint is listed with its size in bytes and the checksum of each `chunk_bytes`
stretch of it (hex xxh3_64: ~15 GB/s on one core, far faster than a disk reads), so a shard truncated
by a node crash, a file deleted by a clean-up script or a flipped block is found before DeepSpeed or
transformers trip over it. ``trainer_state.json`` and ``otr_state.json`` are rewritten after the checkpoint is
published (its size and save time, save_timing.record_save; the best after its evaluation,
best_checkpoint.record_best_in), so they are checked to parse rather than checksummed.

At scale the files are large (Qwen3-8B: a 16 GB export and ~100 GB of optimizer shards), so the
chunks are shared over the ranks (`share_chunks`: the largest first, each to the rank with the least
work so far) and each rank reads only its share; the results are gathered on every rank.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Optional

import xxhash

MANIFEST = "manifest.json"
FORMAT = 1
ALGORITHM = "xxh3_64"
CHUNK_BYTES = 256 << 20  # a 16 GB export is 64 chunks: enough to keep 64 ranks busy
READ_BYTES = 8 << 20  # one read() of a chunk
# Rewritten in place (atomically) after the checkpoint is published: checked to be readable JSON.
REWRITTEN = ("trainer_state.json", "otr_state.json")

Chunk = tuple[str, int]  # (path relative to the checkpoint, chunk index)


def list_files(directory: Path) -> dict[str, int]:
    """{relative POSIX path: size in bytes} of every file under `directory`, sorted; without the manifest
    itself and atomic writers' temporary files (``.name.<random>.tmp``, renamed away at any moment)."""
    found = {}
    for path in sorted(Path(directory).rglob("*")):
        if path.is_file() and path.name != MANIFEST and not (path.name.startswith(".") and path.name.endswith(".tmp")):
            found[path.relative_to(directory).as_posix()] = path.stat().st_size
    return found


def chunks_of(sizes: dict[str, int], chunk_bytes: int = CHUNK_BYTES) -> list[Chunk]:
    """Every chunk to checksum, in path order; an empty file is one (empty) chunk."""
    return [(name, index) for name, size in sizes.items() if name not in REWRITTEN
            for index in range(max(1, -(-size // chunk_bytes)))]


def share_chunks(sizes: dict[str, int], world_size: int, chunk_bytes: int = CHUNK_BYTES) -> list[list[Chunk]]:
    """The chunks each rank reads, [rank][i]: the largest first, each to the rank with the fewest bytes so
    far (ties to the lowest rank). The same on every rank, from `sizes` alone."""
    def length(chunk: Chunk) -> int:
        name, index = chunk
        return max(0, min(chunk_bytes, sizes[name] - index * chunk_bytes))

    shares: list[list[Chunk]] = [[] for _ in range(world_size)]
    loads = [0] * world_size
    for chunk in sorted(chunks_of(sizes, chunk_bytes), key=lambda c: (-length(c), c)):
        rank = loads.index(min(loads))
        shares[rank].append(chunk)
        loads[rank] += length(chunk)
    return shares


def chunk_checksum(path: Path, index: int, chunk_bytes: int = CHUNK_BYTES) -> str:
    """Hex xxh3_64 of bytes [index * chunk_bytes, (index + 1) * chunk_bytes) of `path` (fewer at its end)."""
    digest = xxhash.xxh3_64()
    buffer = bytearray(min(READ_BYTES, chunk_bytes))
    view = memoryview(buffer)
    # Unbuffered reads into one buffer: reading, not hashing, is the cost (a copy per read() otherwise).
    with open(path, "rb", buffering=0) as handle:
        handle.seek(index * chunk_bytes)
        left = chunk_bytes
        while left > 0:
            count = handle.readinto(view[:min(len(buffer), left)])
            if not count:
                break
            digest.update(view[:count])
            left -= count
    return digest.hexdigest()


def checksum_share(directory: Path, share: list[Chunk], chunk_bytes: int = CHUNK_BYTES) -> list[tuple[str, int, str]]:
    """(path, chunk index, checksum) of this rank's share of `directory`'s chunks."""
    return [(name, index, chunk_checksum(Path(directory) / name, index, chunk_bytes)) for name, index in share]


def build_manifest(sizes: dict[str, int], checksums: list[tuple[str, int, str]],
                   chunk_bytes: int = CHUNK_BYTES) -> dict[str, Any]:
    """The manifest of files of `sizes` from every rank's `checksum_share` results (any order)."""
    by_file: dict[str, dict[int, str]] = {}
    for name, index, checksum in checksums:
        by_file.setdefault(name, {})[index] = checksum
    files: dict[str, Any] = {}
    for name, size in sizes.items():
        if name in REWRITTEN:
            files[name] = {"check": "json"}
        else:
            chunks = by_file[name]
            files[name] = {"size": size, "chunks": [chunks[i] for i in range(len(chunks))]}
    return {"format": FORMAT, "algorithm": ALGORITHM, "chunk_bytes": chunk_bytes, "files": files}


def read_manifest(checkpoint: Path) -> Optional[dict[str, Any]]:
    """The checkpoint's manifest; None when it has none (saved before otr wrote manifests).

    Raises ValueError when the manifest itself is damaged (truncated, not JSON, another format)."""
    path = Path(checkpoint) / MANIFEST
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{MANIFEST}: unreadable ({err})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT or manifest.get("algorithm") != ALGORITHM:
        raise ValueError(f"{MANIFEST}: not an otr manifest of format {FORMAT} ({ALGORITHM})")
    return manifest


def expected_sizes(manifest: dict[str, Any]) -> dict[str, int]:
    """{path: size} as the manifest records it (0 for the files checked as JSON, which have no chunks)."""
    return {name: entry.get("size", 0) for name, entry in manifest["files"].items()}


def check_share(checkpoint: Path, manifest: dict[str, Any], share: list[Chunk]) -> list[str]:
    """What is wrong with this rank's share of `checkpoint`'s chunks, one line per file (its first chunk's
    owner reports a missing file or a wrong size; the others skip that file); [] when all match."""
    checkpoint = Path(checkpoint)
    chunk_bytes = manifest["chunk_bytes"]
    problems = []
    for name, index in share:
        entry = manifest["files"][name]
        path = checkpoint / name
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            if index == 0:
                problems.append(f"{name}: missing")
            continue
        if size != entry["size"]:
            if index == 0:
                problems.append(f"{name}: {size} bytes, expected {entry['size']}")
            continue
        found = chunk_checksum(path, index, chunk_bytes)
        if found != entry["chunks"][index]:
            start = index * chunk_bytes
            problems.append(f"{name}: {ALGORITHM} of bytes {start}-{min(start + chunk_bytes, size)} is {found}, "
                            f"expected {entry['chunks'][index]}")
    return problems


def check_json_files(checkpoint: Path, manifest: dict[str, Any]) -> list[str]:
    """What is wrong with the files the manifest checks as JSON (missing, unreadable); [] when none."""
    problems = []
    for name, entry in manifest["files"].items():
        if entry.get("check") != "json":
            continue
        try:
            json.loads((Path(checkpoint) / name).read_text())
        except FileNotFoundError:
            problems.append(f"{name}: missing")
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            problems.append(f"{name}: not readable JSON ({err})")
    return problems


def verify_checkpoint(checkpoint: Path, rank: int, world_size: int,
                      on_main: Callable[[Callable[[], Any]], Any],
                      gather: Callable[[Any], list]) -> Optional[list[str]]:
    """What is wrong with `checkpoint` against its manifest, the same list on every rank ([]: intact);
    None when it has no manifest. A collective: every rank reads its share of the chunks.

    on_main: runs a function on rank 0 and hands its result, or its error, to every rank
    (distributed.decide_on_main); gather: every rank's value on every rank (distributed.gather_from_all).
    """
    def manifest_or_damage() -> tuple[Optional[dict], list[str]]:
        try:
            return read_manifest(checkpoint), []
        except ValueError as damaged:
            return None, [str(damaged)]

    manifest, damage = on_main(manifest_or_damage)  # one reader: the others get it over the network
    if damage:
        return damage
    if manifest is None:
        return None
    share = share_chunks(expected_sizes(manifest), world_size, manifest["chunk_bytes"])[rank]
    problems = check_share(checkpoint, manifest, share) + (check_json_files(checkpoint, manifest) if rank == 0 else [])
    return sorted(problem for found in gather(problems) for problem in found)


def write_manifest_of(directory: Path, manifest: dict[str, Any]) -> None:
    """Write `manifest` into `directory` (atomically: a manifest that exists is whole)."""
    from otr_cli.atomic import write_json_atomic

    write_json_atomic(Path(directory) / MANIFEST, manifest)


def subset(manifest: dict[str, Any], names: list[str]) -> dict[str, Any]:
    """The manifest of the files `names` alone (final/: hard links to some of a checkpoint's files)."""
    return {**manifest, "files": {name: manifest["files"][name] for name in names if name in manifest["files"]}}
