"""Drive fastlm's real Triton launchers against a faked CUDA GPU and record every launch.

Used by scripts/compile_kernels.py (ahead-of-time compile of every kernel for sm_80/sm_90) and
tests/ops/test_grid_limits.py (launch grids against CUDA's limits). Nothing runs on a GPU:

- tensors are ``FakeTensor``s on device ``cuda`` (shapes, strides and dtypes only, no memory), so
  the wrappers take their CUDA paths (``x.device.type == "cuda"``) at any size;
- ``torch.cuda.is_available``/``get_device_capability``/``get_device_properties``/``device`` answer
  as an A100 (sm_80, 108 SMs) or H100 (sm_90, 132 SMs) would;
- triton's active driver reports ``GPUTarget("cuda", arch, 32)``;
- ``JITFunction._do_compile`` records (kernel, signature, constexprs, attrs, options) instead of
  compiling, so the launch stops before anything reaches a device; the grid (a tuple or a
  ``meta -> tuple`` callable) is evaluated on the launch's bound arguments and recorded too;
- an autotuned kernel launches once per config its autotuner keeps after pruning (every config
  it may pick at run time), instead of benchmarking.

The specialisation (``tt.divisibility`` of pointers and integers, integers equal to 1 turned
into constants) is triton's own binder's, so a recorded launch is the kernel a GPU run would
compile. TRITON_INTERPRET must be unset when triton and the kernel modules are imported.
Works with triton 3.6 and 3.9 (the hooks used exist in both).
"""

from __future__ import annotations

import contextlib
import os
import types
import warnings
from dataclasses import dataclass, field
from typing import Any

if os.environ.get("TRITON_INTERPRET", "0") == "1":
    raise RuntimeError("fake_cuda needs TRITON_INTERPRET unset (the kernels must be compiled, not interpreted)")

import torch
import triton
from torch._subclasses.fake_tensor import FakeTensorMode
from triton.backends.compiler import GPUTarget
from triton.runtime import driver as _driver
from triton.runtime.autotuner import Autotuner
from triton.runtime.jit import JITFunction

# (SM count, name) of the GPU each arch stands for: the launchers size split counts by SMs.
GPUS = {80: (108, "NVIDIA A100 (faked)"), 90: (132, "NVIDIA H100 (faked)")}
# CUDA's launch limits: grid x < 2^31, y and z <= 65535.
GRID_LIMITS = (2**31 - 1, 65535, 65535)


@dataclass
class Launch:
    """One kernel launch as a GPU run would make it (compile inputs + grid)."""

    fn: JITFunction
    signature: dict
    constexprs: dict
    attrs: dict
    options: dict
    arch: int
    grid: tuple | None = None
    variant: str = ""
    extra: dict = field(default_factory=dict)

    @property
    def kernel(self) -> str:
        return self.fn.__name__

    def constexpr_values(self) -> dict[str, Any]:
        """{param name: value} of the constexpr parameters (the user's ones, not the 1-valued ints)."""
        names = [p.name for p in self.fn.params]
        out = {}
        for path, value in self.constexprs.items():
            idx = path[0] if isinstance(path, tuple) else path
            name = names[idx] if isinstance(idx, int) and idx < len(names) else str(path)
            if self.fn.params[idx].is_constexpr:
                out[name] = value
        return out


class _FakeDriver:
    """The parts of triton's driver the launch path touches."""

    def __init__(self, arch: int):
        self.target = GPUTarget("cuda", arch, 32)

    def get_current_target(self):
        return self.target

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_active_torch_device(self):
        return torch.device("cuda", 0)

    def is_active(self):
        return True


def _basic_getitem(original):
    """Tensor.__getitem__ for FakeTensors on the fake CUDA device: CPU-only torch's C++ indexing
    takes a CUDA device guard and fails, so basic indices (int, slice, ..., None) are applied
    with select/slice/unsqueeze, which give the same view; other indices go to ``original``."""
    basic = (int, slice, type(Ellipsis), type(None))

    def getitem(t, index):
        items = index if isinstance(index, tuple) else (index,)
        if t.device.type != "cuda" or any(isinstance(i, bool) or not isinstance(i, basic) for i in items):
            return original(t, index)
        real = sum(1 for i in items if i is not None and i is not Ellipsis)
        if Ellipsis in items:
            at = items.index(Ellipsis)
            items = items[:at] + (slice(None),) * (t.dim() - real) + items[at + 1:]
        out, dim = t, 0
        for i in items:
            if i is None:
                out = out.unsqueeze(dim)
                dim += 1
            elif isinstance(i, int):
                out = out.select(dim, i)
            else:
                start, stop, step = i.indices(out.shape[dim])
                out = torch.ops.aten.slice(out, dim, start, max(start, stop), step)
                dim += 1
        return out

    return getitem


def _grid_of(fn: JITFunction, grid, args, kwargs) -> tuple:
    if callable(grid):
        meta = dict(zip(fn.arg_names, args))
        meta.update(kwargs)
        grid = grid(meta)
    grid = tuple(int(g) for g in grid)
    return grid + (1,) * (3 - len(grid))


class FakeCuda(contextlib.AbstractContextManager):
    """Within the block, fastlm's launchers see a CUDA GPU of compute capability ``arch`` (80 or
    90); ``launches`` collects what they launch. ``device()`` is the fake CUDA device to build
    inputs on (inside the block, ``torch.empty(..., device="cuda")`` makes FakeTensors)."""

    def __init__(self, arch: int):
        if arch not in GPUS:
            raise ValueError(f"fake_cuda: arch must be one of {sorted(GPUS)}, got {arch}")
        self.arch = arch
        self.launches: list[Launch] = []
        self.variant = ""
        self._stack = contextlib.ExitStack()

    # -- patches -----------------------------------------------------------------------------
    def _patch(self, owner, name, value):
        old = getattr(owner, name)
        setattr(owner, name, value)
        self._stack.callback(setattr, owner, name, old)

    def __enter__(self):
        arch, (sms, gpu_name) = self.arch, GPUS[self.arch]
        props = types.SimpleNamespace(multi_processor_count=sms, major=arch // 10, minor=arch % 10, name=gpu_name,
                                      total_memory=80 * 2**30)
        cuda = torch.cuda
        self._patch(cuda, "is_available", lambda: True)
        self._patch(cuda, "device_count", lambda: 1)
        self._patch(cuda, "current_device", lambda: 0)
        self._patch(cuda, "get_device_capability", lambda *a, **k: (arch // 10, arch % 10))
        self._patch(cuda, "get_device_properties", lambda *a, **k: props)
        self._patch(cuda, "device", lambda *a, **k: contextlib.nullcontext())
        old_driver = _driver._active
        _driver.set_active(_FakeDriver(arch))
        self._stack.callback(setattr, _driver, "_active", old_driver)
        recorder = self

        original_run = JITFunction.run

        def run(fn, *args, grid, warmup, **kwargs):
            recorder._pending_grid = _grid_of(fn, grid, args, kwargs)
            return original_run(fn, *args, grid=grid, warmup=warmup, **kwargs)

        def do_compile(fn, key, signature, device, constexprs, options, attrs, warmup):
            recorder.launches.append(Launch(fn, dict(signature), dict(constexprs), dict(attrs), dict(options.__dict__),
                                            arch, recorder._pending_grid, recorder.variant))
            return None  # nothing compiled: JITFunction.run returns before launching

        def tune(tuner, *args, **kwargs):
            tuner.nargs = dict(zip(tuner.arg_names, args))
            try:
                for config in tuner.prune_configs(kwargs):
                    tuner.fn.run(*args, **kwargs, **config.all_kwargs())
            finally:
                tuner.nargs = None

        self._patch(torch.Tensor, "__getitem__", _basic_getitem(torch.Tensor.__getitem__))
        # Tensor.copy_'s Python binding also takes a CUDA device guard; the aten op does not.
        self._patch(torch.Tensor, "copy_", lambda t, src, non_blocking=False: torch.ops.aten.copy_(t, src, non_blocking))
        self._patch(JITFunction, "run", run)
        self._patch(JITFunction, "_do_compile", do_compile)
        self._patch(Autotuner, "run", tune)
        self._stack.enter_context(warnings.catch_warnings())
        warnings.filterwarnings("ignore", message=".*data pointer of FakeTensor.*")
        self._stack.enter_context(FakeTensorMode(allow_non_fake_inputs=True))
        return self

    def __exit__(self, *exc):
        self._stack.close()
        return False

    @staticmethod
    def device() -> torch.device:
        return torch.device("cuda", 0)


def grid_violations(grid: tuple) -> list[str]:
    """CUDA limits a grid breaks (empty when it launches; an empty grid launches nothing)."""
    out = []
    for axis, (n, limit) in enumerate(zip(grid, GRID_LIMITS)):
        if n > limit:
            out.append(f"grid axis {'xyz'[axis]} = {n} > {limit}")
    return out
