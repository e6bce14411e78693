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
(kill -9, an OOM kill), the kernel kills this process too (PR_SET_PDEATHSIG, Linux), so it never keeps
a GPU after its rank is gone.
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


def die_with_parent(parent_pid: int) -> None:
    """SIGKILL this process when its parent dies (Linux; a no-op elsewhere). The parent may have died
    before the call: then this process already belongs to another parent, and exits now."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent_pid:
        os._exit(1)


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
