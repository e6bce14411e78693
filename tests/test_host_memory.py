"""What a start-up frees goes back to the OS instead of staying resident (otr_cli.train.host_memory)."""

from __future__ import annotations

import ctypes
import os
import subprocess
import sys
from pathlib import Path

import pytest

from otr_cli.train import host_memory
from otr_cli.train.host_memory import large_frees_return_to_os, release_freed_host_memory

MIB = 1024**2


class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                 "keepcost")]


def mmapped_bytes() -> int:
    """Bytes glibc holds in chunks mmap-ed one by one: munmap-ed, so given back, as soon as they are freed."""
    libc = host_memory._glibc()
    libc.mallinfo2.restype = MallInfo2
    return libc.mallinfo2().hblkhd


def has_mallinfo2() -> bool:
    return host_memory._glibc() is not None and hasattr(host_memory._glibc(), "mallinfo2")


# In a fresh process: in this one, free chunks left on the heap by earlier tests would serve the
# allocation before the mmap threshold is ever consulted.
FRESH_PROCESS_CHECK = """
import torch
from test_host_memory import MIB, mmapped_bytes
from otr_cli.train.host_memory import large_frees_return_to_os

# Freeing one mmap-ed 16 MiB chunk raises glibc's own threshold: an 8 MiB tensor would land on the heap.
big = torch.ones(16 * MIB // 4)
del big
with large_frees_return_to_os():
    before = mmapped_bytes()
    tensor = torch.ones(8 * MIB // 4)
    assert mmapped_bytes() >= before + 8 * MIB, "not mmap-ed inside"
    del tensor
    assert mmapped_bytes() == before, "not unmapped when freed"
# Afterwards the threshold is glibc's ceiling again (32 MiB): training allocates as before.
before = mmapped_bytes()
tensor = torch.ones(8 * MIB // 4)
assert mmapped_bytes() == before, "still mmap-ed after"
"""


@pytest.mark.slow
@pytest.mark.skipif(not has_mallinfo2(), reason="mallopt and mallinfo2 are glibc's (2.33+)")
def test_module_sized_tensors_of_a_start_up_are_given_back_when_freed():
    tests = str(Path(__file__).parent)
    env = os.environ | {"PYTHONPATH": os.pathsep.join(filter(None, [tests, os.environ.get("PYTHONPATH")]))}
    result = subprocess.run([sys.executable, "-c", FRESH_PROCESS_CHECK], env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]


def test_without_glibc_nothing_changes(monkeypatch):
    monkeypatch.setattr(host_memory, "_glibc", lambda: None)
    assert release_freed_host_memory() is False
    with large_frees_return_to_os():
        pass
