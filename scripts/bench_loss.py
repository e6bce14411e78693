#!/usr/bin/env python
"""Benchmark the fused token losses against the naive reference (and Liger-Kernel on CUDA).

    python scripts/bench_loss.py --device cpu            # full run, writes docs/benchmarks/bench_loss.{json,md}
    python scripts/bench_loss.py --device cpu --quick    # small shapes, 3 repeats, writes to a temp dir
    python scripts/bench_loss.py --device cuda           # adds Liger's fused linear cross-entropy when importable
    python scripts/bench_loss.py --device cuda --dtype bfloat16 --shapes 16384x4096x151936 \
        --cases fused:sft,fused:otr,liger:sft             # what scripts/gpu_check.py runs

Per shape (N supervised rows, hidden size H, vocabulary V; float32 unless --dtype) it measures

* forward+backward time: one worker process holds the inputs and runs every case in turn,
  round after round (order rotated each round, so that noise from other load hits all cases
  alike), after one warm-up run per case; on CPU each run first waits (up to --quiet-wait s) for
  other processes to leave the CPUs idle. The median over the rounds is reported, and time
  ratios are medians of per-round paired ratios;
* peak memory above the inputs: one fresh process per case creates the inputs, resets the peak
  (CPU: /proc/self/clear_refs and VmHWM; CUDA: torch.cuda.reset_peak_memory_stats), runs one
  forward+backward and reads the peak. The gradients of hidden and weight are part of it (they are
  outputs); "beyond grads" subtracts their size.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
OTR_OPTIONS = {"k": 256, "temperature": 1.3, "beta": -0.1}
FULL_SHAPES = [
    (2048, 576, 49152, "SmolLM2-135M head"),
    (1024, 896, 151936, "Qwen2.5-0.5B head"),
    (512, 4096, 151936, "Qwen3-8B head"),
]
QUICK_SHAPES = [(512, 576, 49152, "SmolLM2 head, quick"), (256, 896, 151936, "Qwen 0.5B head, quick")]
CASES = ["reference:sft", "reference:otr", "fused:sft", "fused:dft", "fused:otr", "fused:otr_exact"]
LIGER_CASE = "liger:sft"
# (name, numerator case, denominator case, metric, target, shapes it applies to (None = all))
TARGETS = [
    ("fused otr time / fused sft time", "fused:otr", "fused:sft", "time", 1.15, [(1024, 896, 151936)]),
    ("fused otr time / fused sft time", "fused:otr", "fused:sft", "time", 1.10, [(512, 4096, 151936)]),
    ("fused otr_exact time / fused sft time", "fused:otr_exact", "fused:sft", "time", 1.10, None),
    ("fused sft time / reference sft time", "fused:sft", "reference:sft", "time", 1.00, None),
    ("fused otr memory / reference otr memory", "fused:otr", "reference:otr", "memory", 0.35, None),
    ("fused otr memory / fused sft memory", "fused:otr", "fused:sft", "memory", 1.15, None),
    # GPU targets of the fused kernel (bf16, against Liger's fused linear cross-entropy).
    ("fused otr time / Liger CE time", "fused:otr", LIGER_CASE, "time", 1.30, None),
    ("fused sft time / Liger CE time", "fused:sft", LIGER_CASE, "time", 1.10, None),
    ("fused sft memory / Liger CE memory", "fused:sft", LIGER_CASE, "memory", 1.10, None),
    ("fused otr memory / Liger CE memory", "fused:otr", LIGER_CASE, "memory", 1.10, None),
    ("fused otr_exact memory / Liger CE memory", "fused:otr_exact", LIGER_CASE, "memory", 1.10, None),
]


# ----------------------------------------------------------------------------- workers (subprocess side)


def make_inputs(n, h, v, device, dtype="float32"):
    """hidden [n, h] ~ N(0, 1), weight [v, h] with logits of std ~3 (both in ``dtype``), labels [n]."""
    import torch

    gen = torch.Generator(device="cpu").manual_seed(0)
    dtype = getattr(torch, dtype)
    hidden = torch.randn(n, h, generator=gen).to(device, dtype).requires_grad_()
    weight = torch.randn(v, h, generator=gen).mul_(3.0 / h**0.5).to(device, dtype).requires_grad_()
    labels = torch.randint(0, v, (n,), generator=gen).to(device)
    return hidden, weight, labels


def run_case(case, hidden, weight, labels):
    """One forward+backward of a case; gradients are left on hidden.grad / weight.grad."""
    import torch

    from otr_cli.losses import fused_token_loss, reference_token_loss

    implementation, objective = case.split(":")
    hidden.grad = None
    weight.grad = None
    if implementation == "liger":
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

        loss = LigerFusedLinearCrossEntropyLoss()(weight, hidden, labels)
    else:
        options = OTR_OPTIONS if objective in ("otr", "otr_exact") else {}
        if objective == "otr_exact":
            options = {key: value for key, value in options.items() if key != "k"}
        fn = fused_token_loss if implementation == "fused" else reference_token_loss
        generator = torch.Generator(device=hidden.device).manual_seed(0)
        loss, _ = fn(hidden, weight, labels, objective=objective, generator=generator, **options)
    loss.backward()


def synchronize(device):
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def busy_cpu_fraction(interval=1.0):
    """Fraction of all CPUs busy over `interval` seconds (this process idles meanwhile), from /proc/stat."""
    def snapshot():
        with open("/proc/stat") as stat:
            fields = [int(x) for x in stat.readline().split()[1:]]
        return sum(fields), fields[3] + fields[4]  # total, idle + iowait

    total0, idle0 = snapshot()
    time.sleep(interval)
    total1, idle1 = snapshot()
    return 1.0 - (idle1 - idle0) / max(total1 - total0, 1)


def wait_for_quiet(max_wait_s, threshold=0.15):
    """Wait (up to max_wait_s) until other processes leave the CPUs idle; returns whether they did.

    On a shared machine another job halves the speed of a run; timing only quiet runs keeps the
    ratios between cases meaningful. Runs that had to start anyway are counted as contended.
    """
    deadline = time.monotonic() + max_wait_s
    while True:
        if busy_cpu_fraction() < threshold:
            return True
        if time.monotonic() > deadline:
            return False


def time_worker(shape, cases, rounds, device, quiet_wait_s, dtype="float32"):
    """Forward+backward seconds per case, cases interleaved round by round, plus contended-run counts."""
    hidden, weight, labels = make_inputs(*shape, device, dtype)
    times = {case: [] for case in cases}
    contended = {case: 0 for case in cases}
    for case in cases:  # warm-up: allocator, kernels, first-touch of long-lived buffers
        run_case(case, hidden, weight, labels)
    for round_index in range(rounds):
        # Rotate the order every round so no case always follows the same neighbour.
        shift = round_index % len(cases)
        for case in cases[shift:] + cases[:shift]:
            if device == "cpu" and quiet_wait_s > 0 and not wait_for_quiet(quiet_wait_s):
                contended[case] += 1
            synchronize(device)
            start = time.perf_counter()
            run_case(case, hidden, weight, labels)
            synchronize(device)
            times[case].append(time.perf_counter() - start)
    return {"times": times, "contended": contended}


def _proc_status_kib(field):
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def memory_worker(shape, case, device, dtype="float32"):
    """Peak bytes above the inputs during one forward+backward in this fresh process."""
    import gc

    import torch

    hidden, weight, labels = make_inputs(*shape, device, dtype)
    gc.collect()
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        run_case(case, hidden, weight, labels)
        torch.cuda.synchronize()
        return {"peak_extra_bytes": torch.cuda.max_memory_allocated() - base, "method": "torch.cuda.max_memory_allocated"}
    base = _proc_status_kib("VmRSS") * 1024
    try:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")  # reset VmHWM (peak RSS) to the current RSS
        method = "VmHWM after /proc/self/clear_refs reset"
    except OSError:
        method = "VmHWM since process start (clear_refs not writable)"
    run_case(case, hidden, weight, labels)
    return {"peak_extra_bytes": _proc_status_kib("VmHWM") * 1024 - base, "method": method}


# ----------------------------------------------------------------------------- driver


def run_worker(args_list, timeout):
    """Run this script as a worker subprocess and return its JSON result."""
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as handle:
        out = handle.name
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    command = [sys.executable, str(Path(__file__).resolve()), *args_list, "--worker-out", out]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout)
    if result.returncode != 0:
        raise RuntimeError(f"worker {' '.join(args_list)} failed:\n{result.stderr[-4000:]}")
    data = json.loads(Path(out).read_text())
    os.unlink(out)
    return data


def liger_available(device):
    if device != "cuda":
        return False
    try:
        import liger_kernel.transformers  # noqa: F401
    except ImportError:
        return False
    return True


def describe_machine(device):
    import torch

    info = {"torch": torch.__version__, "threads": torch.get_num_threads(), "python": platform.python_version()}
    if device == "cuda":
        info["device"] = torch.cuda.get_device_name()
    else:
        info["device"] = platform.processor() or platform.machine()
        try:
            for line in Path("/proc/cpuinfo").read_text().splitlines():
                if line.startswith("model name"):
                    info["device"] = line.split(":", 1)[1].strip()
                    break
        except OSError:
            pass
        info["cpus"] = os.cpu_count()
    return info


def benchmark(shapes, cases, rounds, device, quiet_wait_s, log, dtype="float32"):
    results = []
    for n, h, v, label in shapes:
        log(f"shape N={n} H={h} V={v} ({label}): timing {len(cases)} cases x {rounds} rounds")
        timing = run_worker(["--worker", "time", "--shape", f"{n},{h},{v}", "--cases", ",".join(cases),
                             "--rounds", str(rounds), "--device", device, "--quiet-wait", str(quiet_wait_s),
                             "--dtype", dtype],
                            timeout=6 * 3600)
        times = timing["times"]
        grad_bytes = (2 if dtype in ("bfloat16", "float16") else 4) * (n * h + v * h)
        for case in cases:
            memory = run_worker(["--worker", "memory", "--shape", f"{n},{h},{v}", "--cases", case, "--device", device,
                                 "--dtype", dtype],
                                timeout=3600)
            row = {
                "N": n, "H": h, "V": v, "shape_label": label, "case": case,
                "times_s": times[case], "median_s": statistics.median(times[case]), "min_s": min(times[case]),
                "contended_runs": timing["contended"][case],
                "peak_extra_bytes": memory["peak_extra_bytes"], "grad_bytes": grad_bytes,
                "memory_method": memory["method"],
            }
            results.append(row)
            log(f"  {case:16s} median {row['median_s']:8.3f} s   peak extra {row['peak_extra_bytes'] / 2**20:9.1f} MiB"
                f"   contended runs {row['contended_runs']}")
    return results


def compute_ratios(results):
    """Each target ratio per shape. Time ratios are the median over rounds of the paired per-round
    ratio (both runs from the same round, minutes apart at most), which cancels the slow drifts of
    a shared machine's speed; memory ratios divide the two peaks."""
    by_key = {((r["N"], r["H"], r["V"]), r["case"]): r for r in results}
    shapes = list(dict.fromkeys((r["N"], r["H"], r["V"]) for r in results))
    ratios = []
    for name, top, bottom, metric, target, only in TARGETS:
        for shape in shapes:
            if only is not None and shape not in only:
                continue
            if (shape, top) not in by_key or (shape, bottom) not in by_key:
                continue
            if metric == "time":
                pairs = zip(by_key[(shape, top)]["times_s"], by_key[(shape, bottom)]["times_s"])
                value = statistics.median(a / b for a, b in pairs)
            else:
                value = by_key[(shape, top)]["peak_extra_bytes"] / by_key[(shape, bottom)]["peak_extra_bytes"]
            ratios.append({"ratio": name, "N": shape[0], "H": shape[1], "V": shape[2], "value": value,
                           "target": target, "met": value <= target})
    return ratios


def markdown_report(results, ratios, meta):
    lines = ["# Fused token loss benchmark", "",
             f"Command: `{meta['command']}`  ", f"Device: {meta['machine']['device']} ({meta['device']}), "
             f"torch {meta['machine']['torch']}, {meta['machine']['threads']} threads; {meta.get('dtype', 'float32')}; "
             f"OTR: K={OTR_OPTIONS['k']}, temperature={OTR_OPTIONS['temperature']}, beta={OTR_OPTIONS['beta']}; "
             f"median of {meta['rounds']} interleaved rounds; {meta['date']}.", ""]
    shapes = list(dict.fromkeys((r["N"], r["H"], r["V"], r["shape_label"]) for r in results))
    for n, h, v, label in shapes:
        lines += [f"## N={n}, H={h}, V={v} ({label})", "",
                  "| case | median time (s) | min time (s) | peak extra memory (MiB) | beyond grads (MiB) | contended runs |",
                  "| --- | ---: | ---: | ---: | ---: | ---: |"]
        for r in results:
            if (r["N"], r["H"], r["V"]) == (n, h, v):
                beyond = (r["peak_extra_bytes"] - r["grad_bytes"]) / 2**20
                lines.append(f"| {r['case']} | {r['median_s']:.3f} | {r['min_s']:.3f} | "
                             f"{r['peak_extra_bytes'] / 2**20:.1f} | {beyond:.1f} | {r['contended_runs']} |")
        lines.append("")
    lines += ["## Ratios against the targets", "",
              "Time ratios: median over the rounds of the ratio of the two cases' times in the same round.", "",
              "| ratio | shape (N, H, V) | value | target | met |",
              "| --- | --- | ---: | ---: | :---: |"]
    for r in ratios:
        lines.append(f"| {r['ratio']} | ({r['N']}, {r['H']}, {r['V']}) | {r['value']:.3f} | <= {r['target']:.2f} | "
                     f"{'yes' if r['met'] else 'no'} |")
    lines += ["", "Peak extra memory includes the gradients of hidden and weight (4 (N H + V H) bytes), which "
              "every implementation must return; \"beyond grads\" subtracts them. A contended run started while "
              "other processes kept the CPUs busy (after waiting up to --quiet-wait seconds for them).", ""]
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--quick", action="store_true", help="small shapes, 3 rounds, output to a temp dir")
    parser.add_argument("--rounds", type=int, default=None, help="timed rounds per case (default 7, quick 3)")
    parser.add_argument("--shapes", help="override the shapes, e.g. 1024x896x151936,512x4096x151936")
    parser.add_argument("--out-dir", type=Path, default=None,
                        help="default docs/benchmarks (with --quick or --shapes: a temp dir)")
    parser.add_argument("--quiet-wait", type=float, default=300.0,
                        help="CPU: before each timed run wait up to this many seconds for other load to stop "
                             "(0 disables); runs that start anyway are reported as contended")
    parser.add_argument("--worker", choices=("time", "memory"), help=argparse.SUPPRESS)
    parser.add_argument("--worker-out", help=argparse.SUPPRESS)
    parser.add_argument("--shape", help=argparse.SUPPRESS)
    parser.add_argument("--cases", help=f"comma-separated subset of {','.join(CASES + [LIGER_CASE])} "
                                         "(default: all; Liger's when importable)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                        help="dtype of hidden and weight (default float32)")
    args = parser.parse_args(argv)

    if args.worker:
        shape = tuple(int(x) for x in args.shape.split(","))
        cases = args.cases.split(",")
        if args.worker == "time":
            data = time_worker(shape, cases, args.rounds, args.device, args.quiet_wait, args.dtype)
        else:
            data = memory_worker(shape, cases[0], args.device, args.dtype)
        Path(args.worker_out).write_text(json.dumps(data))
        return

    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            parser.error("--device cuda: no CUDA device available")
    rounds = args.rounds or (3 if args.quick else 7)
    shapes = QUICK_SHAPES if args.quick else FULL_SHAPES
    if args.shapes:
        shapes = [(*map(int, text.split("x")), "custom") for text in args.shapes.split(",")]
    scratch_run = args.quick or args.shapes or args.cases or args.dtype != "float32"
    out_dir = args.out_dir or (Path(tempfile.mkdtemp(prefix="bench_loss_")) if scratch_run else REPO / "docs" / "benchmarks")
    cases = args.cases.split(",") if args.cases else CASES + ([LIGER_CASE] if liger_available(args.device) else [])
    unknown = sorted(set(cases) - set(CASES + [LIGER_CASE]))
    if unknown:
        parser.error(f"--cases: unknown {unknown}; choose from {CASES + [LIGER_CASE]}")
    meta = {
        "command": "python scripts/bench_loss.py " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:])),
        "device": args.device, "machine": describe_machine(args.device), "rounds": rounds,
        "date": time.strftime("%Y-%m-%d"), "otr_options": OTR_OPTIONS, "dtype": args.dtype,
    }
    results = benchmark(shapes, cases, rounds, args.device, args.quiet_wait, log=lambda msg: print(msg, flush=True),
                        dtype=args.dtype)
    ratios = compute_ratios(results)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "bench_loss.json").write_text(json.dumps({**meta, "results": results, "ratios": ratios}, indent=2) + "\n")
    report = markdown_report(results, ratios, meta)
    (out_dir / "bench_loss.md").write_text(report)
    print(report)
    print(f"wrote {out_dir / 'bench_loss.json'} and {out_dir / 'bench_loss.md'}")


if __name__ == "__main__":
    main()
