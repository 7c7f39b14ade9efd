"""Backend selection: which implementation of an op runs for a given call.

Three backends exist: ``reference`` (plain PyTorch, every device), ``triton`` (Triton kernels:
CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1`` for tests) and ``cuda`` (the C++/CUDA
extension built from csrc/). By default a call on CUDA tensors goes to a backend that is
available for the device *and* has a kernel for the op: the fastest one measured for that op in
the speed table (:func:`load_speed_table`, ``$FASTLM_SPEED_TABLE``, written from a benchmark run
by ``python -m bench.speed_table``), else the first of ``cuda`` > ``triton`` > ``reference``.
Automatic selection takes ``cuda`` only when the extension is already built (the prebuilt
``fastlm._C`` imports, or a build was loaded in this process): it never starts an nvcc JIT build
in the middle of a call. A JIT build happens only when the cuda backend is forced, or on
``fastlm build-ext`` / ``fastlm._extension.load_extension()``.
``use_backend(name)`` (also a context manager) or the ``FASTLM_BACKEND`` environment variable
forces one: a forced backend that cannot run raises :class:`BackendUnavailableError` saying why,
and one with no kernel for the op raises ``NotImplementedError`` — never a silent fallback.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import importlib.util
import os
import sys
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import torch

BACKENDS = ("reference", "triton", "cuda")
_AUTO_ORDER = ("cuda", "triton", "reference")

class _KernelTable(dict):
    """(op name, backend) -> implementation. Any change (register_kernel, or a test's
    monkeypatch.setitem) drops the cached backend decisions."""

    def __setitem__(self, key, value) -> None:
        super().__setitem__(key, value)
        _decisions.clear()

    def __delitem__(self, key) -> None:
        super().__delitem__(key)
        _decisions.clear()


# (op, device type, use_backend's name, $FASTLM_BACKEND, $TRITON_INTERPRET) -> backend name.
_decisions: dict[tuple, str] = {}
# The reference backend is filled in by fastlm.ops.registry.define_op; kernel adapters add
# theirs with @register_kernel.
_KERNELS: dict[tuple[str, str], Callable] = _KernelTable()


class _Forced:
    """The backend forced by use_backend (a plain attribute: torch.compile traces it)."""

    name: str | None = None


_forced = _Forced()


class BackendUnavailableError(RuntimeError):
    """A forced backend cannot run here (missing package, wrong device, no build)."""


def register_kernel(op: str, backend: str) -> Callable[[Callable], Callable]:
    """Decorator: register ``fn`` as the ``backend`` implementation of ``op``."""
    _check_name(backend)

    def decorator(fn: Callable) -> Callable:
        _KERNELS[(op, backend)] = fn
        return fn

    return decorator


def kernel_for(op: str, backend: str) -> Callable:
    """The registered implementation, or NotImplementedError naming the op and backend."""
    try:
        return _KERNELS[(op, backend)]
    except KeyError:
        raise NotImplementedError(
            f"fastlm op '{op}' has no '{backend}' kernel yet; "
            f"use the 'reference' backend or another one with a kernel for it"
        ) from None


def has_kernel(op: str, backend: str) -> bool:
    return (op, backend) in _KERNELS


def _check_name(name: str) -> None:
    if name not in BACKENDS:
        raise ValueError(f"unknown fastlm backend {name!r}; expected one of {', '.join(BACKENDS)}")


def triton_interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.lru_cache(maxsize=None)
def _triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


def backend_status(name: str, device: torch.device | str) -> tuple[bool, str]:
    """(available, reason) for running backend ``name`` on tensors of ``device``."""
    _check_name(name)
    device = torch.device(device)
    if name == "reference":
        return True, "plain PyTorch runs on every device"
    if name == "triton":
        if not _triton_installed():
            return False, "triton is not installed (pip install triton)"
        if device.type == "cuda":
            return True, "Triton kernels on CUDA"
        if device.type == "cpu" and triton_interpret():
            return True, "Triton interpreter on CPU (TRITON_INTERPRET=1)"
        return False, (
            f"Triton kernels need CUDA tensors, got tensors on '{device.type}' "
            "(set TRITON_INTERPRET=1 before importing triton to run them on CPU for tests)"
        )
    # cuda
    if device.type != "cuda":
        return False, f"the C++/CUDA extension needs CUDA tensors, got tensors on '{device.type}'"
    from fastlm import _extension

    return _extension.extension_status()


def _auto_status(name: str, device: torch.device) -> bool:
    """Whether automatic selection may use ``name`` on ``device``: as backend_status, except
    that cuda needs the extension already built (no JIT build is started for it)."""
    if name == "cuda":
        from fastlm import _extension

        return device.type == "cuda" and _extension.extension_ready()[0]
    return backend_status(name, device)[0]


# ---- measured speed ---------------------------------------------------------------------------

SPEED_TABLE_ENV = "FASTLM_SPEED_TABLE"
_speed: dict[str, dict[str, float]] | None = None  # op -> backend -> seconds per call
_speed_loaded = False


def set_speed_table(table: dict[str, dict[str, float]] | None) -> None:
    """Use ``table`` (op -> backend -> measured seconds or ms, any one unit) for automatic
    selection; None: no measurements (the fixed order)."""
    global _speed, _speed_loaded
    if table is not None:
        for op, times in table.items():
            for name, value in times.items():
                _check_name(name)
                if not (isinstance(value, (int, float)) and value > 0):
                    raise ValueError(f"speed table: {op}/{name} must be a time > 0, got {value!r}")
    _speed, _speed_loaded = table, True
    _decisions.clear()


def load_speed_table(path: str | os.PathLike | None = None) -> dict[str, dict[str, float]] | None:
    """Read the speed table JSON (``{"ops": {op: {backend: median_ms}}, ...}``) from ``path`` or
    ``$FASTLM_SPEED_TABLE`` and use it; None (and the fixed order) when neither is given."""
    import json

    path = path if path is not None else os.environ.get(SPEED_TABLE_ENV) or None
    if path is None:
        set_speed_table(None)
        return None
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as err:
        raise ValueError(f"speed table {path} (from {SPEED_TABLE_ENV} or the path given) cannot be read: {err}") from err
    if not isinstance(data, dict) or not isinstance(data.get("ops"), dict):
        raise ValueError(f"speed table {path}: expected a JSON object with an 'ops' mapping op -> backend -> ms")
    set_speed_table(data["ops"])
    return data["ops"]


def _measured(op: str) -> dict[str, float] | None:
    if not _speed_loaded:
        load_speed_table()
    return None if _speed is None else _speed.get(op)


def available_backends(device: torch.device | str = "cpu") -> list[str]:
    """Backends that can run on ``device``, fastest first."""
    return [name for name in _AUTO_ORDER if backend_status(name, device)[0]]


def forced_backend() -> str | None:
    """The backend forced by use_backend() or FASTLM_BACKEND, if any."""
    name = _forced.name or os.environ.get("FASTLM_BACKEND") or None
    if name is not None:
        _check_name(name)
    return name


class use_backend(contextlib.AbstractContextManager):
    """Force a backend for every fastlm op.

    ``with fastlm.use_backend("triton"): ...`` forces it inside the block;
    ``fastlm.use_backend("reference")`` called plainly forces it until changed, and
    ``fastlm.use_backend(None)`` returns to automatic selection.
    """

    def __init__(self, name: str | None) -> None:
        if name is not None:
            _check_name(name)
        self._previous, _forced.name = _forced.name, name

    def __exit__(self, *exc_info) -> None:
        _forced.name = self._previous


# The environment as the cache key sees it: os.environ's own dict on POSIX (bytes keys; kept in
# sync by os.environ[...] = and monkeypatch.setenv), skipping the str encoding of os.environ.get.
_ENV_DATA = getattr(os.environ, "_data", None)
if os.name == "posix" and isinstance(_ENV_DATA, dict):
    _ENV_BACKEND, _ENV_INTERPRET = b"FASTLM_BACKEND", b"TRITON_INTERPRET"
    _getenv = _ENV_DATA.get
else:  # pragma: no cover  (Windows)
    _ENV_BACKEND, _ENV_INTERPRET = "FASTLM_BACKEND", "TRITON_INTERPRET"
    _getenv = os.environ.get


def select(op: str, device: torch.device) -> str:
    """Name of the backend that runs ``op`` for tensors on ``device``.

    The decision is cached per (op, device type, forced backend, $TRITON_INTERPRET): a call
    costs one dict lookup. The cache is dropped when a kernel is registered or the speed table
    changes; a forced backend that cannot run raises on every call (errors are not cached)."""
    if torch.compiler.is_compiling():
        return _select(op, device)
    forced, env = _forced.name, _getenv(_ENV_BACKEND)
    key = (op, device.type, forced, env, _getenv(_ENV_INTERPRET))
    name = _decisions.get(key)
    if name is None:
        name = _select(op, device)
        # Auto selection on CUDA takes the cuda backend once the extension is built: while an
        # op has a cuda kernel that is not ready yet, decide again on the next call.
        if forced or env or device.type != "cuda" or name == "cuda" or not has_kernel(op, "cuda"):
            _decisions[key] = name
    return name


# Under torch.compile the decision is made once, in Python, and baked into the graph as a
# constant: Dynamo does not trace the status probes (importlib, the extension's loader), which
# some torch versions refuse to trace (torch 2.11: importlib.util.find_spec is skipped).
@torch.compiler.assume_constant_result
def _select(op: str, device: torch.device) -> str:
    name = forced_backend()
    if name is None and device.type != "cuda":
        return "reference"  # kernels run automatically only on CUDA (the interpreter is for tests)
    if name is not None:
        ok, why = backend_status(name, device)
        if not ok:
            raise BackendUnavailableError(f"fastlm backend '{name}' is forced but unavailable: {why}")
        kernel_for(op, name)  # raises NotImplementedError if the op has no kernel there
        return name
    candidates = [c for c in _AUTO_ORDER if has_kernel(op, c) and _auto_status(c, device)]
    measured = _measured(op)
    if measured:
        timed = [c for c in candidates if c in measured]
        if timed:
            return min(timed, key=measured.__getitem__)
    return candidates[0] if candidates else "reference"


_FASTLM_DIR = Path(__file__).resolve().parents[1]
_CHECKOUT_KERNELS = _FASTLM_DIR.parent / "kernels"  # kernels/ beside fastlm/ in a source checkout


def kernel_module(name: str) -> ModuleType:
    """The Triton kernel module ``fastlm.kernels.<name>``, imported on first use (this is where
    triton gets imported: importing fastlm never does).

    Installed, kernels/ is the fastlm.kernels package (setuptools' package-dir). Run from a
    source checkout — not installed, or with an editable install of another tree — the
    package is bound to the checkout's kernels/, so the kernels always match the calling code.
    """
    package = "fastlm.kernels"
    if package not in sys.modules and not (_FASTLM_DIR / "kernels").is_dir() and (_CHECKOUT_KERNELS / "__init__.py").is_file():
        spec = importlib.util.spec_from_file_location(
            package, _CHECKOUT_KERNELS / "__init__.py", submodule_search_locations=[str(_CHECKOUT_KERNELS)]
        )
        module = importlib.util.module_from_spec(spec)
        sys.modules[package] = module
        spec.loader.exec_module(module)
        sys.modules["fastlm"].kernels = module
    return importlib.import_module(f"{package}.{name}")
