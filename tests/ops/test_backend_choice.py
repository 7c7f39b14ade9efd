"""Automatic backend choice on CUDA tensors: never a JIT build of the extension, and the
measured speed table over the fixed order. Runs without a GPU: select() only consults the
backends' availability for a device, which is faked here."""

import json

import pytest
import torch

from fastlm import _extension
from fastlm.ops import backend

CUDA = torch.device("cuda", 0)


@pytest.fixture
def gpu_like(monkeypatch):
    """triton available on 'cuda'; the extension buildable by JIT but not built."""
    monkeypatch.setattr(backend, "_triton_installed", lambda: True)
    monkeypatch.setattr(backend, "_speed", None)
    monkeypatch.setattr(backend, "_speed_loaded", True)
    monkeypatch.setattr(backend, "_decisions", {})  # decisions cached under other test doubles
    monkeypatch.delenv("FASTLM_BACKEND", raising=False)
    monkeypatch.setattr(_extension, "_probe_status", lambda: (True, "JIT build from csrc with nvcc at /x/bin/nvcc"))
    builds = []
    monkeypatch.setattr(_extension, "_load", _FakeLoad(builds))
    return builds


class _FakeLoad:
    """Stands for _extension._load: records a build when called; cache_info like lru_cache."""

    def __init__(self, builds):
        self.builds, self.loaded = builds, False

    def __call__(self):
        self.builds.append("nvcc")
        self.loaded = True
        return object(), None

    def cache_info(self):
        return type("Info", (), {"currsize": int(self.loaded)})()


def test_auto_selection_never_starts_a_jit_build(gpu_like):
    assert backend.has_kernel("w8a8_linear", "cuda") and backend.has_kernel("w8a8_linear", "triton")
    assert backend.select("w8a8_linear", CUDA) == "triton"
    assert gpu_like == []  # nothing compiled
    ok, why = _extension.extension_ready()
    assert not ok and "fastlm build-ext" in why


def test_forcing_cuda_may_build_and_then_auto_uses_it(gpu_like):
    with backend.use_backend("cuda"):
        assert backend.select("w8a8_linear", CUDA) == "cuda"
    _extension._load()  # what the forced kernel's load_extension() does: the JIT build
    assert gpu_like == ["nvcc"]
    assert _extension.extension_ready()[0]
    assert backend.select("w8a8_linear", CUDA) == "cuda"  # built now: auto may take it


def test_a_prebuilt_extension_is_used_automatically(gpu_like, monkeypatch):
    monkeypatch.setattr(_extension, "_probe_status", lambda: (True, "prebuilt fastlm._C"))
    assert backend.select("w8a8_linear", CUDA) == "cuda"
    assert gpu_like == []


def test_measured_speed_decides(gpu_like, monkeypatch):
    monkeypatch.setattr(_extension, "_probe_status", lambda: (True, "prebuilt fastlm._C"))
    backend.set_speed_table({"w8a8_linear": {"cuda": 2.0, "triton": 1.0, "reference": 9.0}})
    assert backend.select("w8a8_linear", CUDA) == "triton"  # faster, although cuda comes first
    backend.set_speed_table({"w8a8_linear": {"cuda": 0.5, "triton": 1.0}})
    assert backend.select("w8a8_linear", CUDA) == "cuda"
    # an op without measurements keeps the fixed order; a measured backend that is not available
    # (here: no kernel for the op) is not chosen
    backend.set_speed_table({"rms_norm": {"reference": 0.1, "cuda": 0.01}})
    assert backend.select("w8a8_linear", CUDA) == "cuda"
    assert backend.select("rms_norm", CUDA) == "reference"  # triton unmeasured; cuda has no rms_norm kernel
    # forcing still wins over measurements
    with backend.use_backend("triton"):
        assert backend.select("w8a8_linear", CUDA) == "triton"


def test_speed_table_file(gpu_like, monkeypatch, tmp_path):
    monkeypatch.setattr(_extension, "_probe_status", lambda: (True, "prebuilt fastlm._C"))
    path = tmp_path / "speed.json"
    path.write_text(json.dumps({"device": "fake", "ops": {"w8a8_linear": {"cuda": 3.0, "triton": 1.5}}}))
    monkeypatch.setenv(backend.SPEED_TABLE_ENV, str(path))
    monkeypatch.setattr(backend, "_speed_loaded", False)
    assert backend.select("w8a8_linear", CUDA) == "triton"
    path.write_text(json.dumps({"ops": {"w8a8_linear": {"nvcc": 1.0}}}))
    with pytest.raises(ValueError, match="unknown fastlm backend 'nvcc'"):
        backend.load_speed_table(path)
    path.write_text("[1, 2]")
    with pytest.raises(ValueError, match="'ops' mapping"):
        backend.load_speed_table(path)
    backend.set_speed_table(None)


def test_the_choice_is_baked_into_compiled_graphs(gpu_like):
    """Under torch.compile the choice is made in Python, once, and becomes a constant of the
    graph: Dynamo never traces the availability probes (torch 2.11's refused importlib's
    find_spec there, breaking compile=True decoding on the GPU). fullgraph: no graph break."""
    calls = []

    def probe():  # a probe Dynamo cannot trace without a graph break (fullgraph would raise)
        calls.append(1)
        torch._dynamo.graph_break()
        return True

    backend._triton_installed = probe  # restored by gpu_like's monkeypatch

    def step(x):
        return x + len(backend.select("rms_norm", CUDA))

    torch._dynamo.reset()
    out = torch.compile(step, fullgraph=True, backend="eager")(torch.zeros(2))
    assert out.tolist() == [len("triton")] * 2
    assert calls  # probed, in Python
