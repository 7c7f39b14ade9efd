"""Build script for the optional CUDA extension ``fastlm._C`` (metadata lives in pyproject.toml).

``FASTLM_BUILD_CUDA=1`` forces the build (and fails saying why if impossible), ``=0`` skips
it, unset/``auto`` builds it only where torch is a CUDA build and a matching nvcc is found.
Without it fastlm installs as pure Python; the cuda backend then JIT-builds on first use.
The source list and the decision live in ``fastlm/_extension.py``, loaded here by path
because fastlm itself is not importable yet.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).resolve().parent


def _load_extension_module():
    path = ROOT / "fastlm" / "_extension.py"
    spec = importlib.util.spec_from_file_location("_fastlm_extension", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _extension_kwargs() -> dict:
    ext = _load_extension_module()
    build, reason = ext.should_build()
    print(f"fastlm: {reason}", file=sys.stderr)
    if not build:
        return {}
    # torch reads CUDA_HOME when cpp_extension is imported; use the toolkit found above.
    os.environ.setdefault("CUDA_HOME", ext.find_cuda_home())
    from torch.utils.cpp_extension import BuildExtension, CUDAExtension

    extension = CUDAExtension(
        name=ext.EXTENSION_NAME,
        sources=ext.SOURCES,  # relative to this directory, as setuptools requires
        include_dirs=[str(ext.CSRC_DIR)],
        depends=[str(p.relative_to(ROOT)) for p in sorted(ext.CSRC_DIR.glob("*.h"))],
        extra_compile_args={"cxx": ext.EXTRA_CFLAGS, "nvcc": ext.EXTRA_CUDA_CFLAGS},
    )
    return {
        "ext_modules": [extension],
        "cmdclass": {"build_ext": BuildExtension.with_options(use_ninja=True)},
    }


setup(**_extension_kwargs())
