"""ops.sample builds its four per-row parameter tensors from scalar settings once per batch size,
device and values (fastlm.ops.sampling._SCALAR_PARAMS), not every step of a decode loop."""

import pytest
import torch

from fastlm import ops
from fastlm.ops import sampling


def _built(monkeypatch):
    calls = []
    build = sampling._build_row_params

    def counting(*args):
        calls.append(args)
        return build(*args)

    monkeypatch.setattr(sampling, "_build_row_params", counting)
    monkeypatch.setattr(sampling, "_SCALAR_PARAMS", {})
    return calls


def test_scalar_settings_are_built_once_and_keyed_by_everything_they_depend_on(monkeypatch):
    calls = _built(monkeypatch)
    logits = torch.randn(3, 11)
    for _ in range(4):
        ops.sample(logits, temperature=0.7, top_k=5, top_p=0.9)
    assert len(calls) == 1
    ops.sample(logits, temperature=0.8, top_k=5, top_p=0.9)  # another value
    ops.sample(torch.randn(2, 11), temperature=0.7, top_k=5, top_p=0.9)  # another batch size
    ops.sample(torch.randn(3, 4), temperature=0.7, top_k=5, top_p=0.9)  # another vocabulary (top_k clamps to V)
    assert len(calls) == 4
    temperature, top_k, top_p, min_p = sampling._row_params(torch.randn(3, 4), 0.7, 5, 0.9, None)
    assert top_k.tolist() == [4, 4, 4] and temperature.tolist() == [torch.tensor(0.7).item()] * 3
    assert top_p.tolist() == [torch.tensor(0.9).item()] * 3 and min_p.tolist() == [0.0] * 3


def test_the_cached_draw_equals_a_fresh_one_and_tensor_settings_bypass_the_cache(monkeypatch):
    calls = _built(monkeypatch)
    logits = torch.randn(4, 9)
    first = [ops.sample(logits, temperature=0.5, top_p=0.8, generator=torch.Generator().manual_seed(s)) for s in range(3)]
    again = [ops.sample(logits, temperature=0.5, top_p=0.8, generator=torch.Generator().manual_seed(s)) for s in range(3)]
    assert all(torch.equal(a, b) for a, b in zip(first, again)) and len(calls) == 1
    ops.sample(logits, temperature=torch.full((4,), 0.5))
    ops.sample(logits, temperature=torch.full((4,), 0.5))
    assert len(calls) == 3  # per-row tensors are the caller's: never cached


@pytest.mark.parametrize("bad", [{"top_k": True}, {"top_k": [1, 2]}, {"temperature": float("nan")}, {"top_p": 0.0}])
def test_an_invalid_setting_is_refused_every_time(monkeypatch, bad):
    _built(monkeypatch)
    logits = torch.randn(2, 5)
    ops.sample(logits, top_k=1)  # cached: top_k=True (== 1, same hash) must not hit it
    for _ in range(2):
        with pytest.raises(ValueError, match="sample: "):
            ops.sample(logits, **bad)


def test_tensors_built_in_inference_mode_are_not_reused_outside_it(monkeypatch):
    """Inference tensors cannot be saved for backward: logits that require grad, sampled after
    the same settings were used under inference_mode, still work."""
    calls = _built(monkeypatch)
    logits = torch.randn(2, 6)
    with torch.inference_mode():
        ops.sample(logits, temperature=0.5)
    params = sampling._row_params(logits, 0.5, None, None, None)
    assert len(calls) == 2 and not any(t.is_inference() for t in params)
