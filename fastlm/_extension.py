"""The fastlm C++/CUDA extension: one source list, the build decision, and loading.

The same ``SOURCES`` feed the ahead-of-time build in ``setup.py`` (``fastlm._C``) and the
lazy JIT build (``torch.utils.cpp_extension.load``) used when no prebuilt module exists.

``setup.py`` loads this file by path, before fastlm is importable, so the module level
imports only the standard library; torch is imported inside functions.
"""

from __future__ import annotations

import functools
import importlib
import logging
import os
import re
import shutil
import subprocess
from collections.abc import Mapping
from pathlib import Path
from types import ModuleType

logger = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parent.parent
CSRC_DIR = REPO_ROOT / "csrc"
#: Extension sources relative to the repo root. One ``.cu`` per op family + the binding file.
SOURCES: list[str] = [
    "csrc/bindings.cpp",
    "csrc/sampling.cu",
    "csrc/int8.cu",
]
EXTENSION_NAME = "fastlm._C"
JIT_NAME = "fastlm_C"
EXTRA_CFLAGS: list[str] = ["-O3"]
EXTRA_CUDA_CFLAGS: list[str] = ["-O3", "-lineinfo", "--expt-relaxed-constexpr"]
BUILD_ENV_VAR = "FASTLM_BUILD_CUDA"

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}
_AUTO = {"", "auto"}
_NO_NVCC = "nvcc not found (set CUDA_HOME or put the CUDA toolkit's nvcc on PATH)"


def source_paths(root: Path = REPO_ROOT) -> list[Path]:
    """Absolute paths of ``SOURCES`` under ``root``."""
    return [root / s for s in SOURCES]


def missing_sources(root: Path = REPO_ROOT) -> list[str]:
    """``SOURCES`` entries that do not exist under ``root`` (e.g. installed from a wheel)."""
    return [s for s, p in zip(SOURCES, source_paths(root)) if not p.is_file()]


def _is_cuda_home(path: Path) -> bool:
    """A toolkit root: bin/nvcc and the runtime headers (conda puts them under targets/*/)."""
    headers = (path / "include" / "cuda_runtime.h").is_file() or any(
        path.glob("targets/*/include/cuda_runtime.h")
    )
    return (path / "bin" / "nvcc").is_file() and headers


def find_cuda_home(env: Mapping[str, str] | None = None) -> str | None:
    """The CUDA toolkit root: ``$CUDA_HOME`` / ``$CUDA_PATH``, else ``nvcc`` on ``PATH``, else
    ``/usr/local/cuda``. Unlike torch, a ``PATH`` nvcc that is a wrapper script outside the
    toolkit (e.g. ``/usr/local/bin/nvcc``) is not taken to mean ``CUDA_HOME=/usr/local``."""
    env = os.environ if env is None else env
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if env.get(var):
            return env[var]
    nvcc = shutil.which("nvcc", path=env.get("PATH"))
    if nvcc is not None:
        home = Path(nvcc).resolve().parent.parent
        if _is_cuda_home(home):
            return str(home)
    default = Path("/usr/local/cuda")
    if _is_cuda_home(default):
        return str(default.resolve())
    return None


def nvcc_path(cuda_home: str) -> Path:
    return Path(cuda_home) / "bin" / "nvcc"


def nvcc_version(cuda_home: str) -> str | None:
    """``"13.0"`` from ``nvcc --version``, or None when nvcc cannot be run."""
    try:
        out = subprocess.run(
            [str(nvcc_path(cuda_home)), "--version"],
            capture_output=True, text=True, timeout=60, check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    match = re.search(r"release (\d+\.\d+)", out)
    return match.group(1) if match else None


def _torch_cuda_version() -> str | None:
    """``torch.version.cuda``; raises ImportError when torch is not importable."""
    import torch

    return torch.version.cuda


def _cpu_only_reason() -> str:
    return "torch is a CPU-only build (torch.version.cuda is None)"


def _import_prebuilt() -> tuple[ModuleType | None, str | None]:
    """(module, None) if ``fastlm._C`` imports; (None, why) otherwise (None reason: not built)."""
    import torch  # noqa: F401  (the extension needs torch's shared libraries loaded first)

    try:
        return importlib.import_module(EXTENSION_NAME), None
    except ModuleNotFoundError as err:
        if err.name in (EXTENSION_NAME, "fastlm"):
            return None, None
        return None, f"prebuilt {EXTENSION_NAME} failed to import: {err}"
    except ImportError as err:  # present but broken, e.g. built against another torch
        return None, f"prebuilt {EXTENSION_NAME} failed to import: {err}"


def _jit_problem() -> tuple[str | None, str | None]:
    """(problem, cuda_home): why a JIT build from csrc/ cannot run, or None if it can."""
    missing = missing_sources()
    if missing:
        return (
            f"{EXTENSION_NAME} was not built ahead of time and the sources are missing "
            f"({', '.join(missing)} not under {REPO_ROOT}); reinstall from a source checkout "
            f"with {BUILD_ENV_VAR}=1",
            None,
        )
    cuda_home = find_cuda_home()
    if cuda_home is None:
        return _NO_NVCC, None
    if shutil.which("ninja") is None:
        return "ninja not found (torch's JIT build needs it: pip install ninja)", cuda_home
    return None, cuda_home


def extension_status() -> tuple[bool, str]:
    """Whether the cuda backend is usable in principle, and why. Never compiles.

    Cached per process (cheap enough for per-call dispatch); once ``load_extension()`` has
    failed in this process, the answer is False with the load error.
    """
    ok, reason = _probe_status()
    if ok and _load.cache_info().currsize:
        module, error = _load()
        if module is None:
            return False, error
    return ok, reason


def extension_ready() -> tuple[bool, str]:
    """Whether the extension can be used without compiling anything: the prebuilt ``fastlm._C``
    imports, or a build was already loaded in this process. What automatic backend selection
    asks (it never starts a JIT build); cheap after the first call."""
    if _load.cache_info().currsize:
        module, error = _load()
        return (True, f"{JIT_NAME} loaded in this process") if module is not None else (False, error)
    ok, reason = _probe_status()
    if ok and reason.startswith("prebuilt"):
        return True, reason
    if not ok:
        return False, reason
    return False, (f"{EXTENSION_NAME} is not built ({reason} is possible: run `fastlm build-ext`, "
                   f"install with {BUILD_ENV_VAR}=1, or force the cuda backend)")


@functools.lru_cache(maxsize=None)
def _probe_status() -> tuple[bool, str]:
    try:
        cuda = _torch_cuda_version()
    except ImportError as err:
        return False, f"torch is not importable: {err}"
    if cuda is None:
        return False, _cpu_only_reason()
    import torch

    if not torch.cuda.is_available():
        return False, "no CUDA device (torch.cuda.is_available() is False)"
    module, import_error = _import_prebuilt()
    if module is not None:
        return True, f"prebuilt {EXTENSION_NAME}"
    problem, cuda_home = _jit_problem()
    if problem is not None:
        return False, problem if import_error is None else f"{import_error}; {problem}"
    reason = f"JIT build from {CSRC_DIR} with nvcc at {nvcc_path(cuda_home)}"
    return True, reason if import_error is None else f"{reason} ({import_error})"


@functools.lru_cache(maxsize=None)
def _load() -> tuple[ModuleType | None, str | None]:
    """Cached (module, None) or (None, error): a failed build is not retried in-process."""
    try:
        cuda = _torch_cuda_version()
    except ImportError as err:
        return None, f"torch is not importable: {err}"
    if cuda is None:
        return None, _cpu_only_reason()
    module, import_error = _import_prebuilt()
    if module is not None:
        return module, None
    if import_error is not None:
        logger.warning("%s; falling back to a JIT build", import_error)
    problem, cuda_home = _jit_problem()
    if problem is not None:
        return None, problem
    # torch reads CUDA_HOME when cpp_extension is first imported; give it the one found here.
    os.environ.setdefault("CUDA_HOME", cuda_home)
    from torch.utils import cpp_extension

    torch_home = cpp_extension.CUDA_HOME
    if torch_home is None or (torch_home != cuda_home and not _is_cuda_home(Path(torch_home))):
        # cpp_extension was imported before CUDA_HOME was set, and guessed wrong.
        return None, (
            f"torch.utils.cpp_extension uses CUDA_HOME={torch_home}, which is not a CUDA toolkit; "
            f"set CUDA_HOME={cuda_home} before starting Python"
        )
    logger.info("JIT-building %s from %s (first use; cached afterwards)", JIT_NAME, CSRC_DIR)
    try:
        module = cpp_extension.load(
            name=JIT_NAME,
            sources=[str(p) for p in source_paths()],
            extra_cflags=EXTRA_CFLAGS,
            extra_cuda_cflags=EXTRA_CUDA_CFLAGS,
            extra_include_paths=[str(CSRC_DIR)],
            with_cuda=True,
            verbose=False,
        )
    except (RuntimeError, OSError, subprocess.SubprocessError) as err:
        # torch's message carries the compiler output.
        return None, f"JIT build of {JIT_NAME} from {CSRC_DIR} failed:\n{err}"
    return module, None


def load_extension() -> ModuleType:
    """The extension module: prebuilt ``fastlm._C``, else a lazy JIT build from ``csrc/``.

    The JIT build is cached in-process and, across processes, in torch's extension cache
    (``$TORCH_EXTENSIONS_DIR``). Raises RuntimeError saying why when neither is possible.
    """
    module, error = _load()
    if module is None:
        raise RuntimeError(f"fastlm CUDA extension unavailable: {error}")
    return module


def should_build(env: Mapping[str, str] | None = None) -> tuple[bool, str]:
    """The ahead-of-time build decision used by ``setup.py``.

    ``FASTLM_BUILD_CUDA=0`` skips, ``=1`` forces (RuntimeError saying why if impossible),
    unset/``auto`` builds only when torch is a CUDA build and a CUDA toolkit whose major
    version matches torch's is found.
    """
    env = os.environ if env is None else env
    flag = env.get(BUILD_ENV_VAR, "auto").strip().lower()
    if flag in _FALSE:
        return False, f"{BUILD_ENV_VAR}={env[BUILD_ENV_VAR]}: skipping the CUDA extension"
    if flag not in _TRUE | _AUTO:
        raise ValueError(f"{BUILD_ENV_VAR} must be 0, 1 or auto, got {env[BUILD_ENV_VAR]!r}")
    forced = flag in _TRUE
    ok, reason = _build_possible(env)
    if not ok and forced:
        raise RuntimeError(f"{BUILD_ENV_VAR}=1 but {EXTENSION_NAME} cannot be built: {reason}")
    return ok, reason


def _build_possible(env: Mapping[str, str]) -> tuple[bool, str]:
    try:
        torch_cuda = _torch_cuda_version()
    except ImportError as err:
        return False, f"torch is not importable ({err}); build with --no-build-isolation"
    if torch_cuda is None:
        return False, _cpu_only_reason()
    cuda_home = find_cuda_home(env)
    if cuda_home is None:
        return False, _NO_NVCC
    missing = missing_sources()
    if missing:
        return False, f"sources missing: {', '.join(missing)}"
    nvcc = nvcc_version(cuda_home)
    if nvcc is None:
        return False, f"cannot run {nvcc_path(cuda_home)} --version"
    if nvcc.split(".")[0] != torch_cuda.split(".")[0]:
        return False, f"nvcc {nvcc} at {cuda_home} does not match torch's CUDA {torch_cuda}"
    return True, f"building {EXTENSION_NAME} with nvcc {nvcc} at {cuda_home} (torch CUDA {torch_cuda})"
