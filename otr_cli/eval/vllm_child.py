"""vLLM generation in a clean child process: `python -m otr_cli.eval.vllm_child REQUEST.json RESULT.json`.

Why a child: vLLM's ``LLM(...)`` claims a fixed fraction of GPU memory for its KV cache and is
never fully shut down inside a process. In a fresh process that loads vLLM, generates, writes its
results and exits, the GPU memory is returned to the driver when it ends, whatever vLLM does, and
the parent (``otr eval``, or ``otr train`` between steps) never imports vLLM at all.

Protocol (one JSON file each way; the parent is ``generation.generate_vllm``):

* request: {"model": directory or hub id, "prompt_token_ids": [[int]] (encoded by the parent as
  its HF backend encodes them: vLLM adds no BOS of its own), "sampling": {n, temperature, top_p,
  max_tokens, stop, seed}, "engine": {gpu_memory_utilization, tensor_parallel_size, max_model_len,
  dtype, seed} (None values are left to vLLM)}
* result (written atomically, only on success): {"completions": [[str] * n per prompt],
  "seconds": generation wall time, "startup_seconds": engine start-up, "generated_tokens": int}
* exit code 0 on success; ``MISSING_VLLM`` (3) when ``import vllm`` fails (the parent turns it
  into a config error naming eval.backend); anything else is a failure whose output the parent
  reports.

The parent starts this process in a session of its own (a signal to the parent's process group does
not reach it) and ends it, with its group, on a stop request. Should the parent die without doing so
(kill -9, an OOM kill), this process ends its group too (die_with_parent), so neither it nor vLLM's
engine and worker processes keep a GPU after their rank is gone.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path

MISSING_VLLM = 3
PR_SET_PDEATHSIG = 1


def end_own_group(*_) -> None:
    """SIGKILL this process and what it started (vLLM's engine-core and worker processes, which do not
    watch for their parent's death): its whole process group when it leads one (the parent starts it in
    a session of its own), else itself alone."""
    if os.getpgrp() == os.getpid():
        os.killpg(os.getpid(), signal.SIGKILL)
    os.kill(os.getpid(), signal.SIGKILL)


def die_with_parent(parent_pid: int) -> None:
    """End this process's group when its parent dies (Linux): the kernel sends SIGTERM (PR_SET_PDEATHSIG),
    whose handler ends the group; a daemon thread that watches the parent's pid does the same should the
    main thread be held in native code. The parent may have died before this call: then this ends now."""
    import threading

    signal.signal(signal.SIGTERM, end_own_group)
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)

    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(0.5)
        end_own_group()

    if os.getppid() != parent_pid:
        end_own_group()
    threading.Thread(target=watch, name="otr-parent-watch", daemon=True).start()


def write_json_atomic(path: Path, data: dict) -> None:
    """Write then rename, so the parent never reads half a result (no otr import: the child stays light)."""
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(json.dumps(data))
    os.replace(temporary, path)


def main(argv: list[str]) -> int:
    die_with_parent(int(os.environ.get("OTR_VLLM_PARENT_PID", os.getppid())))
    request_path, result_path = Path(argv[0]), Path(argv[1])
    request = json.loads(request_path.read_text())
    try:
        from vllm import LLM, SamplingParams
    except ImportError as exc:
        print(f"vllm is not importable in {sys.executable}: {exc}", file=sys.stderr)
        return MISSING_VLLM
    engine = {key: value for key, value in request["engine"].items() if value is not None}
    started = time.perf_counter()
    llm = LLM(model=request["model"], **engine)
    startup = time.perf_counter() - started
    params = SamplingParams(**request["sampling"])
    started = time.perf_counter()
    outputs = llm.generate([{"prompt_token_ids": ids} for ids in request["prompt_token_ids"]], params,
                           use_tqdm=False)
    seconds = time.perf_counter() - started
    completions = [[choice.text for choice in output.outputs] for output in outputs]
    generated = sum(len(choice.token_ids) for output in outputs for choice in output.outputs)
    write_json_atomic(result_path, {"completions": completions, "seconds": seconds, "startup_seconds": startup,
                                    "generated_tokens": generated})
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
