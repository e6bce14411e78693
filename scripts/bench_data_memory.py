"""Host memory and start time of the training data per rank: W gloo ranks build the data as `otr train` does
(otr_cli.train.loop._build_data_once: the tokenized-data cache, shared between ranks) and collate the first
step's micro-batches.

    python scripts/bench_data_memory.py --num-train 4000 200000 --world 2 [--out docs/benchmarks/bench_data_memory]

For each number of synthetic_arith training records it runs W ranks twice with a fresh cache directory:
first a miss (the data is tokenized), then a hit (the entry stored by the miss is read). Each rank reports:

- build_s: seconds in _build_data_once;
- rss_mib / pss_mib: the growth of the rank's resident set and of its proportional set size (Pss: a page
  that k processes share counts 1/k in each, so the ranks' Pss add up to what the node holds) from just
  before the data is built to just after the first step's micro-batches are collated;
- bytes_per_token: the node's share (the ranks' Pss growth summed) per token of the training data.

Writes <out>.json and a Markdown table <out>.md. Linux only (reads /proc/self/smaps_rollup).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MIB = 1024 ** 2


def _memory() -> dict[str, int]:
    """Rss and Pss of this process in bytes."""
    values = {}
    for line in Path("/proc/self/smaps_rollup").read_text().splitlines():
        name, _, rest = line.partition(":")
        if name in ("Rss", "Pss"):
            values[name.lower()] = int(rest.split()[0]) * 1024
    return values


def rank_main(num_train: int, cache_dir: str, out: str) -> None:
    """One rank: build the data, collate step 1's micro-batches, write the measurements as JSON."""
    from otr_cli.config import TrainConfig
    from otr_cli.data import collate_batch
    from otr_cli.models import load_tokenizer
    from otr_cli.train import loop
    from otr_cli.train.batches import StepPlan
    from otr_cli.train.distributed import init_distributed

    dist_info = init_distributed(60.0)
    cfg = TrainConfig()
    cfg.data.synthetic.num_train, cfg.data.cache_dir = num_train, cache_dir
    tokenizer = load_tokenizer("smollm2-135m-instruct")
    before = _memory()
    started = time.perf_counter()
    data = loop._build_data_once(cfg, tokenizer, dist_info)
    build_s = time.perf_counter() - started
    lengths = data.train.lengths.tolist() if hasattr(data.train, "lengths") else [len(e.input_ids) for e in data.train]
    plan = StepPlan(len(data.train), cfg.trainer.micro_batch_size, cfg.trainer.grad_accum, dist_info.world_size,
                    seed=cfg.seed, shuffle=cfg.data.shuffle, lengths=tuple(lengths))
    for indices in plan.rank_micro_batches(0, dist_info.rank):
        collate_batch([data.train[i] for i in indices], tokenizer.pad_token_id)
    after = _memory()
    Path(out).write_text(json.dumps({
        "rank": dist_info.rank, "cache": data.report.cache, "build_s": build_s, "tokens": data.report.total_tokens,
        "rss_growth": after["rss"] - before["rss"], "pss_growth": after["pss"] - before["pss"]}))


def run_ranks(world: int, num_train: int, cache_dir: str, work: Path, label: str) -> list[dict]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    processes = []
    for rank in range(world):
        env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world),
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1"}
        out = work / f"{label}.rank{rank}.json"
        log = open(work / f"{label}.rank{rank}.log", "w")
        processes.append(subprocess.Popen([sys.executable, __file__, "--rank-main", str(num_train), cache_dir,
                                           str(out)], env=env, stdout=log, stderr=subprocess.STDOUT))
    for process in processes:
        if process.wait() != 0:
            raise SystemExit(f"a rank failed: see {work}/{label}.rank*.log")
    return [json.loads((work / f"{label}.rank{rank}.json").read_text()) for rank in range(world)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-train", type=int, nargs="+", default=[4000, 200000])
    parser.add_argument("--world", type=int, default=2)
    parser.add_argument("--out", default="bench_data_memory")
    parser.add_argument("--label", default="", help="a name for the code measured (e.g. a commit)")
    parser.add_argument("--rank-main", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.rank_main:
        rank_main(int(args.rank_main[0]), args.rank_main[1], args.rank_main[2])
        return
    rows = []
    with tempfile.TemporaryDirectory(prefix="otr-bench-data-") as work:
        for num_train in args.num_train:
            cache_dir = str(Path(work) / f"cache-{num_train}")
            for attempt in ("miss", "hit"):
                ranks = run_ranks(args.world, num_train, cache_dir, Path(work), f"{num_train}-{attempt}")
                tokens = ranks[0]["tokens"]
                rows.append({"num_train": num_train, "start": attempt, "tokens": tokens, "ranks": ranks,
                             "build_s_max": max(r["build_s"] for r in ranks),
                             "node_pss_mib": sum(r["pss_growth"] for r in ranks) / MIB,
                             "rss_mib_per_rank": [r["rss_growth"] / MIB for r in ranks],
                             "bytes_per_token_node": sum(r["pss_growth"] for r in ranks) / max(tokens, 1)})
                print(json.dumps(rows[-1]), flush=True)
    result = {"label": args.label, "world": args.world, "command": " ".join(sys.argv), "rows": rows}
    Path(f"{args.out}.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [f"# Data memory and start time, {args.world} ranks ({args.label or 'this checkout'})", "",
             f"`{result['command']}`", "",
             "| records | start | tokens | data build (s, slowest rank) | RSS growth per rank (MiB) | node Pss growth (MiB) "
             "| bytes per token (node) |", "| --- | --- | --- | --- | --- | --- | --- |"]
    for row in rows:
        lines.append(f"| {row['num_train']} | {row['start']} | {row['tokens']} | {row['build_s_max']:.1f} | "
                     f"{', '.join(f'{v:.0f}' for v in row['rss_mib_per_rank'])} | {row['node_pss_mib']:.0f} | "
                     f"{row['bytes_per_token_node']:.1f} |")
    Path(f"{args.out}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
