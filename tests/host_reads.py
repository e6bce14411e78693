"""Count the operations that read a tensor's data back to the host: on a GPU each is a synchronisation.

On CPU nothing waits, so the tests count the operations that would: Python-level reads (``.item()``,
``.tolist()``, ``.cpu()``, ``float(t)``, ``bool(t)``, ``.numpy()``) seen by a TorchFunctionMode, and the
operators whose output size or value depends on the data (``nonzero``, ``masked_select``, boolean-mask
indexing, ``_local_scalar_dense``) seen by a TorchDispatchMode, each read counted once.
"""

from __future__ import annotations

import contextlib
import traceback

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

READ_METHODS = {torch.Tensor.item, torch.Tensor.tolist, torch.Tensor.cpu, torch.Tensor.numpy,
                torch.Tensor.__bool__, torch.Tensor.__int__, torch.Tensor.__float__, torch.Tensor.__index__}
aten = torch.ops.aten
READ_OPERATORS = {aten._local_scalar_dense.default, aten.nonzero.default, aten.masked_select.default,
                  aten.unique_consecutive.default, aten._unique2.default, aten.repeat_interleave.Tensor}


class _PythonReads(TorchFunctionMode):
    def __init__(self, counter: "HostReads"):
        super().__init__()
        self.counter = counter

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in READ_METHODS and not self.counter.inside:
            self.counter.record(getattr(func, "__name__", str(func)))
            self.counter.inside = True  # the operators it dispatches are the same read
            try:
                return func(*args, **kwargs)
            finally:
                self.counter.inside = False
        return func(*args, **kwargs)


class _OperatorReads(TorchDispatchMode):
    def __init__(self, counter: "HostReads"):
        super().__init__()
        self.counter = counter

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not self.counter.inside and (func in READ_OPERATORS or _boolean_mask_index(func, args)):
            self.counter.record(str(func))
        return func(*args, **(kwargs or {}))


MASK_INDEXED = {aten.index.Tensor, aten.index_put.default, aten.index_put_.default, aten._index_put_impl_.default}


def _boolean_mask_index(func, args) -> bool:
    """t[mask] (and t[mask] = v): the result's size is the mask's count, read by the host."""
    if func not in MASK_INDEXED or len(args) < 2:
        return False
    return any(isinstance(index, torch.Tensor) and index.dtype == torch.bool for index in args[1] or ())


class HostReads:
    """``with HostReads() as reads: ...``; then ``reads.events``: (operation, where in the code) per read."""

    def __init__(self):
        self.events: list[tuple[str, str]] = []
        self.inside = False
        self._stack = contextlib.ExitStack()

    def record(self, name: str) -> None:
        frames = [f for f in traceback.extract_stack()[:-3] if "host_reads.py" not in f.filename
                  and "/torch/" not in f.filename]
        where = f"{frames[-1].filename}:{frames[-1].lineno}" if frames else "?"
        self.events.append((name, where))

    def __enter__(self) -> "HostReads":
        self._stack.enter_context(_PythonReads(self))
        self._stack.enter_context(_OperatorReads(self))
        return self

    def __exit__(self, *exc) -> None:
        self._stack.close()
