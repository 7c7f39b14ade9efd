"""Count device→host reads, as a GPU would feel them, while running on CPU.

A read of a device value stalls the host until the device catches up (a sync). On CPU nothing
stalls, but the same calls still show: ``aten._local_scalar_dense`` (every ``.item()``,
``int(t)``, ``float(t)``, ``bool(t)``), recorded with a ``TorchDispatchMode``, plus
``Tensor.tolist()`` (which on CPU skips the dispatcher) and copies of non-CPU tensors to the CPU
(``aten._to_copy`` / ``copy_``; only seen where a device exists). ``Tensor.numpy()`` is not
counted: it only works on host tensors, so it is never a device sync.
"""

from __future__ import annotations

import contextlib
import traceback

import torch
from torch.utils._python_dispatch import TorchDispatchMode


class HostReads(TorchDispatchMode):
    """``with HostReads() as reads: ...``; ``reads.count`` and ``reads.where`` (call sites)."""

    def __init__(self) -> None:
        super().__init__()
        self.where: list[str] = []

    @property
    def count(self) -> int:
        return len(self.where)

    def _record(self, what: str) -> None:
        frames = [f for f in traceback.extract_stack()[:-2] if "/fastlm/" in f.filename]
        site = f"{frames[-1].filename.split('/fastlm/')[-1]}:{frames[-1].lineno}" if frames else "?"
        self.where.append(f"{what} at {site}")

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.ops.aten._local_scalar_dense.default:
            self._record("item")
        elif func in (torch.ops.aten._to_copy.default, torch.ops.aten.copy_.default):
            src = args[1] if func is torch.ops.aten.copy_.default else args[0]
            dst_cpu = (args[0].device.type == "cpu") if func is torch.ops.aten.copy_.default else (
                torch.device(kwargs.get("device") or src.device).type == "cpu")
            if src.device.type not in ("cpu", "meta") and dst_cpu:
                self._record("copy to cpu")
        return func(*args, **kwargs)

    def __enter__(self):
        original = torch.Tensor.tolist
        mode = self

        def tolist(tensor, *args, **kwargs):
            mode._record("tolist")
            return original(tensor, *args, **kwargs)

        self._restore = contextlib.ExitStack()
        torch.Tensor.tolist = tolist
        self._restore.callback(setattr, torch.Tensor, "tolist", original)
        return super().__enter__()

    def __exit__(self, *exc):
        self._restore.close()
        return super().__exit__(*exc)
