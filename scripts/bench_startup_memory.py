"""Peak host memory per rank at start-up under ZeRO-3: 1 rank against 2 ranks, partitioned load against plain.

    python scripts/bench_startup_memory.py [--layers 12] [--out bench_startup_memory.json]

Builds a random Qwen3-architecture model once (cached in $OTR_CACHE/bench-qwen3-L<layers>, fp32,
safetensors shards of 500 MB, SmolLM2's tokenizer), then for each mode (partitioned: what otr does;
plain: every rank loads the whole model and deepspeed.initialize partitions it, as before partitioned loading)
and each world size (1, 2) starts that many gloo CPU ranks. Each rank builds the DeepSpeed engine
with otr's own build_engine (ZeRO-3, fp32, micro batch 1) and reports, in GiB:

- peak private memory (the headline): the highest RssAnon of /proc/self/status, sampled every
  20 ms by a background thread. Anonymous pages belong to one process alone, so the sum over the
  ranks of a node is what the node must hold.
- peak RSS (VmHWM, = ru_maxrss): also counts the file pages of the memory-mapped safetensors
  checkpoint. Those live in the page cache, shared by every rank that maps the same file and
  reclaimable, so summing them over ranks counts one copy per rank that the node never holds.
- private memory and RSS once the engine is built.

No training step is run (torch's AdamW allocates its moments on the first step, the same for both
modes). Linux only. Writes JSON and prints a table.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

GIB = 1024**3


def model_dir(layers: int) -> Path:
    from otr_cli.models import cache_root

    return cache_root() / f"bench-qwen3-L{layers}"


def build_model(layers: int) -> Path:
    """A random Qwen3 of ~0.1B + 27.5M x layers parameters, saved once."""
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from otr_cli.models import load_tokenizer

    directory = model_dir(layers)
    if (directory / "config.json").is_file():
        return directory
    tokenizer = load_tokenizer("smollm2-135m-instruct")
    config = Qwen3Config(vocab_size=len(tokenizer), hidden_size=1536, intermediate_size=4608, num_hidden_layers=layers,
                         num_attention_heads=12, num_key_value_heads=4, head_dim=128, max_position_embeddings=4096,
                         tie_word_embeddings=False, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    staging = directory.with_name(directory.name + ".tmp")
    Qwen3ForCausalLM(config).save_pretrained(staging, safe_serialization=True, max_shard_size="500MB")
    tokenizer.save_pretrained(staging)
    os.replace(staging, directory)
    return directory


def status_gib(*fields: str) -> dict[str, float]:
    """Fields of /proc/self/status (reported in kB), in GiB."""
    values = {}
    with open("/proc/self/status") as status:
        for line in status:
            key, _, value = line.partition(":")
            if key in fields:
                values[key] = int(value.split()[0]) * 1024 / GIB
    return values


class PeakPrivateMemory(threading.Thread):
    """Highest RssAnon (GiB) seen while running: the kernel keeps a high-water mark for RSS only."""

    def __init__(self, every_s: float = 0.02):
        super().__init__(daemon=True)
        self.every_s, self.peak_gib, self.running = every_s, 0.0, True

    def run(self) -> None:
        while self.running:
            self.peak_gib = max(self.peak_gib, status_gib("RssAnon")["RssAnon"])
            time.sleep(self.every_s)

    def stop(self) -> float:
        self.running = False
        self.join()
        return max(self.peak_gib, status_gib("RssAnon")["RssAnon"])


def worker(directory: str, mode: str, report: str) -> None:
    """One rank: build the engine as `otr train deepspeed=zero3` does, then write what this process holds."""
    import torch.distributed as dist

    from otr_cli import models
    from otr_cli.config import TrainConfig
    from otr_cli.train.distributed import init_distributed
    from otr_cli.train.engine import build_engine

    sampler = PeakPrivateMemory()
    sampler.start()
    info = init_distributed()
    if mode == "plain":
        models.partitioned_loading = lambda _config: contextlib.nullcontext()  # the load before partitioned loading
    cfg = TrainConfig()
    cfg.model.name_or_path = directory
    cfg.deepspeed.zero_stage = 3
    cfg.trainer.micro_batch_size = 1
    cfg.trainer.max_steps = 1
    started = time.time()
    engine = build_engine(cfg, total_steps=1, world_size=info.world_size)
    seconds = time.time() - started
    peak_private = sampler.stop()
    now = status_gib("RssAnon", "VmRSS", "VmHWM")
    params = sum(p.ds_numel if hasattr(p, "ds_numel") else p.numel() for p in engine.lm.parameters())
    Path(report).write_text(json.dumps({
        "rank": info.rank, "world_size": info.world_size, "mode": mode, "params": params,
        "peak_private_gib": peak_private, "peak_rss_gib": now["VmHWM"],
        "private_gib": now["RssAnon"], "rss_gib": now["VmRSS"], "build_engine_s": seconds}))
    dist.barrier()


def run_ranks(directory: Path, mode: str, world: int, work: Path) -> list[dict]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    processes, reports = [], []
    for rank in range(world):
        report = work / f"{mode}-{world}-rank{rank}.json"
        report.unlink(missing_ok=True)
        reports.append(report)
        env = os.environ | {"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world),
                            "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1"}
        processes.append(subprocess.Popen([sys.executable, __file__, "--worker", str(directory), mode, str(report)],
                                          env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True))
    for process in processes:
        _, err = process.communicate()
        if process.returncode != 0:
            raise SystemExit(f"a {mode} rank of {world} failed:\n{err[-3000:]}")
    return [json.loads(r.read_text()) for r in reports]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--modes", default="plain,partitioned")
    parser.add_argument("--out", default="bench_startup_memory.json")
    parser.add_argument("--worker", nargs=3, metavar=("DIR", "MODE", "REPORT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(*args.worker)
        return
    directory = build_model(args.layers)
    work = Path(args.out).resolve().parent
    results = {}
    for mode in args.modes.split(","):
        for world in (1, 2):
            results[f"{mode}/{world}"] = run_ranks(directory, mode, world, work)
    table = ["| load | ranks | peak private per rank | total | / 1 rank | peak RSS per rank | total | / 1 rank |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for mode in args.modes.split(","):
        row = {}
        for world in (1, 2):
            row[world] = []
            for metric in ("peak_private_gib", "peak_rss_gib"):
                ranks = results[f"{mode}/{world}"]
                total = sum(r[metric] for r in ranks)
                one = sum(r[metric] for r in results[f"{mode}/1"])
                row[world] += [", ".join(f"{r[metric]:.2f}" for r in ranks), f"{total:.2f}", f"{total / one:.2f}x"]
            table.append(f"| {mode} | {world} | " + " | ".join(row[world]) + " |")
    params = results[next(iter(results))][0]["params"]
    summary = {"model": str(directory), "params": params, "fp32_gib": params * 4 / GIB, "results": results,
               "table": table}
    Path(args.out).write_text(json.dumps(summary, indent=2))
    print(f"random Qwen3, {args.layers} layers, {params / 1e6:.0f}M parameters ({params * 4 / GIB:.2f} GiB in fp32); "
          "GiB; private = RssAnon sampled every 20 ms, RSS = VmHWM (counts mapped checkpoint pages)")
    print("\n".join(table))


if __name__ == "__main__":
    main()
