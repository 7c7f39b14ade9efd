"""fastlm._extension: the source list, the setup.py build decision, status and loading."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fastlm import _extension as ext

REPO = Path(__file__).resolve().parent.parent
CPU_TORCH = torch.version.cuda is None


@pytest.fixture(autouse=True)
def _fresh_caches():
    ext._load.cache_clear()
    ext._probe_status.cache_clear()
    yield
    ext._load.cache_clear()
    ext._probe_status.cache_clear()


def _fake_toolkit(root: Path, release: str = "13.0") -> Path:
    """A directory laid out like a CUDA toolkit whose nvcc prints ``release``."""
    (root / "bin").mkdir(parents=True)
    (root / "include").mkdir()
    (root / "include" / "cuda_runtime.h").write_text("")
    nvcc = root / "bin" / "nvcc"
    nvcc.write_text(f"#!/bin/sh\necho 'Cuda compilation tools, release {release}, V{release}.1'\n")
    nvcc.chmod(0o755)
    return root


# --- source list -------------------------------------------------------------------------


def test_sources_exist_and_are_all_listed():
    assert ext.CSRC_DIR == REPO / "csrc"
    assert ext.EXTENSION_NAME == "fastlm._C"
    assert ext.missing_sources() == []
    assert all(not Path(s).is_absolute() and s.startswith("csrc/") for s in ext.SOURCES)
    on_disk = {f"csrc/{p.name}" for p in ext.CSRC_DIR.iterdir() if p.suffix in (".cpp", ".cu")}
    assert on_disk == set(ext.SOURCES), "every csrc/*.cpp|*.cu must be in SOURCES (and only those)"


def test_module_loads_by_path_without_fastlm_or_torch():
    code = (
        "import importlib.util, sys\n"
        f"spec = importlib.util.spec_from_file_location('x', {str(REPO / 'fastlm' / '_extension.py')!r})\n"
        "m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m)\n"
        "assert m.SOURCES and m.EXTENSION_NAME == 'fastlm._C'\n"
        "assert 'fastlm' not in sys.modules and 'torch' not in sys.modules, sorted(sys.modules)\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd="/")


# --- setup.py decision ---------------------------------------------------------------------


@pytest.mark.parametrize("flag", ["0", "false", "off"])
def test_should_build_skips_when_disabled(flag):
    build, reason = ext.should_build({ext.BUILD_ENV_VAR: flag})
    assert not build and "skipping" in reason


def test_should_build_rejects_unknown_flag():
    with pytest.raises(ValueError, match="FASTLM_BUILD_CUDA must be 0, 1 or auto"):
        ext.should_build({ext.BUILD_ENV_VAR: "maybe"})


@pytest.mark.parametrize("flag", [None, "auto", ""])
def test_should_build_auto_without_cuda_torch(monkeypatch, flag):
    monkeypatch.setattr(ext, "_torch_cuda_version", lambda: None)
    env = {} if flag is None else {ext.BUILD_ENV_VAR: flag}
    assert ext.should_build(env) == (False, "torch is a CPU-only build (torch.version.cuda is None)")


def test_should_build_forced_without_cuda_torch_says_why(monkeypatch):
    monkeypatch.setattr(ext, "_torch_cuda_version", lambda: None)
    with pytest.raises(RuntimeError, match="FASTLM_BUILD_CUDA=1 but fastlm._C cannot be built: torch is a CPU-only"):
        ext.should_build({ext.BUILD_ENV_VAR: "1"})


@pytest.mark.skipif(not CPU_TORCH, reason="needs the CPU-only torch build")
def test_should_build_on_this_cpu_torch():
    assert ext.should_build({})[0] is False
    with pytest.raises(RuntimeError, match="CPU-only"):
        ext.should_build({ext.BUILD_ENV_VAR: "1"})


def test_should_build_with_cuda_torch_and_matching_nvcc(monkeypatch, tmp_path):
    home = _fake_toolkit(tmp_path / "cuda")
    monkeypatch.setattr(ext, "_torch_cuda_version", lambda: "13.0")
    for flag in ("auto", "1"):
        build, reason = ext.should_build({ext.BUILD_ENV_VAR: flag, "CUDA_HOME": str(home)})
        assert build and "nvcc 13.0" in reason and str(home) in reason


def test_should_build_refuses_mismatched_nvcc(monkeypatch, tmp_path):
    home = _fake_toolkit(tmp_path / "cuda", release="12.8")
    monkeypatch.setattr(ext, "_torch_cuda_version", lambda: "13.0")
    build, reason = ext.should_build({"CUDA_HOME": str(home)})
    assert not build and "does not match torch's CUDA 13.0" in reason
    with pytest.raises(RuntimeError, match="does not match"):
        ext.should_build({ext.BUILD_ENV_VAR: "1", "CUDA_HOME": str(home)})


def test_should_build_without_nvcc(monkeypatch):
    monkeypatch.setattr(ext, "_torch_cuda_version", lambda: "13.0")
    monkeypatch.setattr(ext, "find_cuda_home", lambda env=None: None)
    assert ext.should_build({}) == (False, ext._NO_NVCC)
    with pytest.raises(RuntimeError, match="nvcc not found"):
        ext.should_build({ext.BUILD_ENV_VAR: "1"})


def test_find_cuda_home(tmp_path):
    home = _fake_toolkit(tmp_path / "cuda")
    assert ext.find_cuda_home({"CUDA_HOME": "/opt/x"}) == "/opt/x"
    assert ext.find_cuda_home({"CUDA_PATH": "/opt/y"}) == "/opt/y"
    assert ext.find_cuda_home({"PATH": str(home / "bin")}) == str(home.resolve())
    conda = _fake_toolkit(tmp_path / "conda")
    (conda / "targets" / "x86_64-linux" / "include").mkdir(parents=True)
    (conda / "include" / "cuda_runtime.h").rename(conda / "targets" / "x86_64-linux" / "include" / "cuda_runtime.h")
    assert ext.find_cuda_home({"PATH": str(conda / "bin")}) == str(conda.resolve())
    # A wrapper nvcc outside any toolkit (like /usr/local/bin/nvcc) does not make its parent a CUDA_HOME.
    wrapper = tmp_path / "wrap" / "bin"
    wrapper.mkdir(parents=True)
    (wrapper / "nvcc").write_text("#!/bin/sh\n")
    (wrapper / "nvcc").chmod(0o755)
    assert ext.find_cuda_home({"PATH": str(wrapper)}) != str(tmp_path / "wrap")


def _run_setup(flag: str) -> subprocess.CompletedProcess:
    env = {**os.environ, ext.BUILD_ENV_VAR: flag}
    return subprocess.run(
        [sys.executable, "setup.py", "--name"], cwd=REPO, env=env, capture_output=True, text=True, timeout=300
    )


def test_setup_py_skips_extension_when_disabled():
    proc = _run_setup("0")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == "fastlm"
    assert "FASTLM_BUILD_CUDA=0: skipping" in proc.stderr


@pytest.mark.skipif(not CPU_TORCH, reason="needs the CPU-only torch build")
def test_setup_py_forced_build_fails_loudly_on_cpu_torch():
    proc = _run_setup("1")
    assert proc.returncode != 0
    assert "FASTLM_BUILD_CUDA=1 but fastlm._C cannot be built: torch is a CPU-only build" in proc.stderr


# --- status and loading --------------------------------------------------------------------


def test_status_and_load_without_cuda_torch(monkeypatch):
    monkeypatch.setattr(ext, "_torch_cuda_version", lambda: None)
    assert ext.extension_status() == (False, "torch is a CPU-only build (torch.version.cuda is None)")
    with pytest.raises(RuntimeError, match="fastlm CUDA extension unavailable: torch is a CPU-only build"):
        ext.load_extension()


@pytest.mark.skipif(not CPU_TORCH, reason="needs the CPU-only torch build")
def test_status_and_load_on_this_cpu_torch():
    ok, reason = ext.extension_status()
    assert not ok and "CPU-only" in reason
    with pytest.raises(RuntimeError, match="CPU-only"):
        ext.load_extension()


def test_status_without_cuda_device(monkeypatch):
    monkeypatch.setattr(ext, "_torch_cuda_version", lambda: "13.0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert ext.extension_status() == (False, "no CUDA device (torch.cuda.is_available() is False)")


def test_status_reports_jit_build_with_nvcc(monkeypatch, tmp_path):
    home = _fake_toolkit(tmp_path / "cuda")
    monkeypatch.setenv("CUDA_HOME", str(home))
    monkeypatch.setattr(ext, "_torch_cuda_version", lambda: "13.0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(ext, "_import_prebuilt", lambda: (None, None))
    monkeypatch.setattr(ext.shutil, "which", lambda name, path=None: f"/usr/bin/{name}")
    assert ext.extension_status() == (True, f"JIT build from {ext.CSRC_DIR} with nvcc at {home}/bin/nvcc")


def test_load_reports_missing_sources(monkeypatch):
    monkeypatch.setattr(ext, "_torch_cuda_version", lambda: "13.0")
    monkeypatch.setattr(ext, "_import_prebuilt", lambda: (None, None))
    monkeypatch.setattr(ext, "SOURCES", [*ext.SOURCES, "csrc/not_there.cu"])
    with pytest.raises(RuntimeError, match=r"not built ahead of time and the sources are missing \(csrc/not_there.cu"):
        ext.load_extension()


def test_load_reports_missing_nvcc(monkeypatch):
    monkeypatch.setattr(ext, "_torch_cuda_version", lambda: "13.0")
    monkeypatch.setattr(ext, "_import_prebuilt", lambda: (None, None))
    monkeypatch.setattr(ext, "find_cuda_home", lambda env=None: None)
    with pytest.raises(RuntimeError, match="nvcc not found"):
        ext.load_extension()


def test_load_reports_compile_failure_with_output(monkeypatch, tmp_path):
    from torch.utils import cpp_extension

    home = _fake_toolkit(tmp_path / "cuda")
    monkeypatch.setenv("CUDA_HOME", str(home))
    monkeypatch.setattr(ext, "_torch_cuda_version", lambda: "13.0")
    monkeypatch.setattr(ext, "_import_prebuilt", lambda: (None, None))
    monkeypatch.setattr(ext.shutil, "which", lambda name, path=None: f"/usr/bin/{name}")
    monkeypatch.setattr(cpp_extension, "CUDA_HOME", str(home))
    calls = []

    def failing_load(**kwargs):
        calls.append(kwargs)
        raise RuntimeError("Error building extension 'fastlm_C': bindings.cpp:1: error: boom")

    monkeypatch.setattr(cpp_extension, "load", failing_load)
    for _ in range(2):  # the failure is cached: one build attempt per process
        with pytest.raises(RuntimeError, match="(?s)JIT build of fastlm_C .* failed:.*error: boom"):
            ext.load_extension()
    assert len(calls) == 1
    assert calls[0]["name"] == "fastlm_C" and calls[0]["with_cuda"] is True
    assert calls[0]["sources"] == [str(p) for p in ext.source_paths()]
    # ... and from then on the backend reports itself unusable, with the compiler output.
    monkeypatch.setattr(ext, "_probe_status", lambda: (True, "JIT build from csrc/"))
    ok, reason = ext.extension_status()
    assert not ok and "error: boom" in reason


# --- on a GPU ------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_extension_builds_and_runs_on_gpu():
    ok, reason = ext.extension_status()
    assert ok, reason
    module = ext.load_extension()
    assert module.has_cuda()
    assert module.compiled_cuda_version().split(".")[0] == torch.version.cuda.split(".")[0]
