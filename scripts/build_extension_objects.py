#!/usr/bin/env python3
"""CI step: compile every source of the C++/CUDA extension (fastlm/_extension.py ``SOURCES``:
bindings.cpp, sampling.cu, int8.cu, with their headers) to object files through torch's own
``CUDAExtension`` + ``BuildExtension`` (ninja, nvcc, torch's flags), for sm_80 and sm_90.

This is the setup.py build minus the final link: linking needs ``libc10_cuda.so`` and
``libtorch_cuda.so``, which a CPU-only torch wheel does not ship, so the link step is skipped
and said so. Two gaps of a CPU wheel are bridged: ``torch.utils.cpp_extension.CUDA_HOME`` is
None (it is set from the toolkit that ``fastlm._extension.find_cuda_home`` finds), and the
build-generated ``c10/cuda/impl/cuda_cmake_macros.h`` is missing (a one-line shim defining
``C10_CUDA_BUILD_SHARED_LIBS``, as a shared-library torch build generates it, is put on the
include path only when torch lacks the real one).

Without nvcc it says so and exits 0 (as scripts/check_cuda_sources.sh does). Exit 1 when a
source does not compile or an object lacks device code for an arch.
Env: FASTLM_EXT_ARCHS (default "8.0;9.0"), MAX_JOBS (ninja's parallelism, default 2).
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _extension_module():
    spec = importlib.util.spec_from_file_location("_fastlm_extension", ROOT / "fastlm" / "_extension.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main() -> int:
    ext_mod = _extension_module()
    cuda_home = ext_mod.find_cuda_home()
    if cuda_home is None:
        print(f"build_extension_objects: {ext_mod._NO_NVCC}; skipping the extension build check")
        return 0
    os.environ["CUDA_HOME"] = cuda_home  # read by torch.utils.cpp_extension at import
    archs = os.environ.get("FASTLM_EXT_ARCHS", "8.0;9.0")
    os.environ["TORCH_CUDA_ARCH_LIST"] = archs
    os.environ.setdefault("MAX_JOBS", "2")

    import torch
    import torch.utils.cpp_extension as cpp
    from setuptools import Distribution

    cpp.CUDA_HOME = cuda_home  # a CPU wheel computed None at import when CUDA_HOME was unset
    work = Path(tempfile.mkdtemp(prefix="fastlm_ext_"))
    include_dirs = [str(ext_mod.CSRC_DIR)]
    torch_include = Path(torch.__file__).parent / "include"
    if not (torch_include / "c10" / "cuda" / "impl" / "cuda_cmake_macros.h").is_file():
        shim = work / "shim" / "c10" / "cuda" / "impl" / "cuda_cmake_macros.h"
        shim.parent.mkdir(parents=True)
        shim.write_text("#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n")
        include_dirs.append(str(work / "shim"))
        print("build_extension_objects: torch lacks c10/cuda/impl/cuda_cmake_macros.h (CPU wheel): using a shim")

    skipped_links = []

    class ObjectsOnly(cpp.BuildExtension):
        """torch's BuildExtension (ninja + nvcc) with the link left out: no CUDA torch libraries."""

        def build_extensions(self):
            self.compiler.link_shared_object = lambda objects, output, *a, **k: skipped_links.append(output)
            super().build_extensions()

    extension = cpp.CUDAExtension(
        name=ext_mod.EXTENSION_NAME,
        sources=[str(p) for p in ext_mod.source_paths()],
        include_dirs=include_dirs,
        extra_compile_args={"cxx": ext_mod.EXTRA_CFLAGS, "nvcc": ext_mod.EXTRA_CUDA_CFLAGS},
    )
    dist = Distribution({"name": "fastlm_ext_check", "ext_modules": [extension],
                         "cmdclass": {"build_ext": ObjectsOnly.with_options(use_ninja=True)}})
    dist.script_args = ["build_ext", "--build-temp", str(work / "build"), "--build-lib", str(work / "lib")]
    dist.parse_command_line()
    start = time.perf_counter()
    print(f"build_extension_objects: torch {torch.__version__}, CUDA_HOME={cuda_home}, archs {archs}", flush=True)
    try:
        dist.run_commands()
    except (SystemExit, Exception) as error:  # a compile failure is the check's result
        print(f"build_extension_objects: FAILED: {type(error).__name__}: {error}")
        return 1
    objects = sorted((work / "build").rglob("*.o"))
    names = {o.name.split(".")[0] for o in objects}
    wanted = {Path(s).stem for s in ext_mod.SOURCES}
    failed = sorted(wanted - names)
    cuobjdump = shutil.which("cuobjdump", path=f"{cuda_home}/bin:{os.environ.get('PATH', '')}")
    for obj in objects:
        line = f"  compiled {obj.relative_to(work / 'build')} ({obj.stat().st_size // 1024} KB)"
        if obj.name.endswith(".cuda.o") and cuobjdump:
            listing = subprocess.run([cuobjdump, "--list-elf", str(obj)], capture_output=True, text=True).stdout
            have = sorted({tok for tok in listing.replace(".", " ").split() if tok.startswith("sm_")})
            line += f": device code for {', '.join(have) or 'no arch'}"
            need = {f"sm_{a.replace('.', '')}" for a in archs.split(";")}
            if not need <= set(have):
                failed.append(f"{obj.name} lacks {sorted(need - set(have))}")
        print(line)
    print(f"build_extension_objects: {len(objects)} objects in {time.perf_counter() - start:.0f}s; link skipped "
          f"({', '.join(Path(p).name for p in skipped_links) or 'none'}): the CPU torch wheel has no libc10_cuda / "
          "libtorch_cuda to link against")
    shutil.rmtree(work, ignore_errors=True)
    if failed:
        print(f"build_extension_objects: FAILED: {failed}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
