"""The public ops' one-pass input checks (the per-call path, bench/bench_dispatch.py) accept
exactly the inputs their detailed checks accept: for valid inputs and for each single fault
(another dtype or device, one dim more or less, a size changed, a non-tensor), the fast predicate
says yes iff the detailed checks raise nothing — so the fast path never lets a bad input through
and never sends a good one to the error path."""

from __future__ import annotations

import itertools

import pytest
import torch

from fastlm.ops import checks, decode, int8, lora, losses, rotary


def _variants(value):
    """``value`` and, for a tensor, each single fault of it: not a tensor, another dtype, the meta
    device, a dim added or dropped, each size +1 and -1 (down to 0), a last dim of stride > 1."""
    yield value
    if not isinstance(value, torch.Tensor):
        return
    yield "not a tensor"
    for dtype in (torch.float16, torch.int64, torch.int32, torch.int8, torch.bool):
        if dtype != value.dtype:
            yield value.to(dtype)
    yield value.to("meta")
    yield value[None]
    if value.dim():
        yield value[0]
    for i, size in enumerate(value.shape):
        for new in (size + 1, size - 1):
            if new >= 0:
                shape = list(value.shape)
                shape[i] = new
                yield torch.zeros(shape, dtype=value.dtype)
    if value.dim() >= 2 and value.shape[-1] > 1:
        yield value.transpose(-1, -2).contiguous().transpose(-1, -2)  # last dim not unit-stride


def _faults(args: dict):
    """The valid arguments, then each argument replaced by each of its faults."""
    yield dict(args)
    for name, value in args.items():
        for variant in itertools.islice(_variants(value), 1, None):
            yield {**args, name: variant}


def _passes(check, args) -> bool:
    try:
        check(**args)
    except (TypeError, ValueError, IndexError, AttributeError):
        return False
    return True


def _agree(fast, detailed, args: dict) -> int:
    """Asserts fast(args) == (the detailed checks pass), for the valid args and each fault;
    returns how many cases were compared."""
    seen = valid = 0
    for case in _faults(args):
        expected = _passes(detailed, case)
        assert fast(**case) == expected, {k: (v.dtype, v.device, tuple(v.shape), v.stride()) if isinstance(
            v, torch.Tensor) else v for k, v in case.items()}
        seen, valid = seen + 1, valid + expected
    assert valid >= 1 and seen - valid >= 10  # the valid case passed, and faults were refused
    return seen


def _t(*shape, dtype=torch.float32):
    return torch.zeros(*shape, dtype=dtype)


def _detailed_attention(q, k, v):
    checks.check_ndim("op", q=(q, 4), k=(k, 4), v=(v, 4))
    checks.check_floating("op", q=q, k=k, v=v)
    checks.check_same_dtype("op", q=q, k=k, v=v)
    checks.check_same_device("op", q=q, k=k, v=v)
    checks.check_heads("op", q, k, v)


@pytest.mark.parametrize("heads", [(4, 2), (3, 3), (4, 1)])
def test_attention_inputs(heads):
    h, hkv = heads
    _agree(checks.attention_inputs_ok, _detailed_attention, {"q": _t(2, h, 3, 8), "k": _t(2, hkv, 5, 8),
                                                             "v": _t(2, hkv, 5, 8)})


def test_paged_decode_inputs():
    args = {"q": _t(2, 4, 1, 8), "k_pages": _t(5, 2, 4, 8), "v_pages": _t(5, 2, 4, 8),
            "block_table": torch.zeros(2, 3, dtype=torch.int32), "cache_lens": torch.tensor([3, 5])}
    _agree(decode._paged_inputs_ok, decode._check_paged_inputs, args)


@pytest.mark.parametrize("theta", [1e4, None])
def test_rope_append_kv_inputs(theta):
    args = {"q": _t(2, 4, 3, 8), "k": _t(2, 2, 3, 8), "v": _t(2, 2, 3, 8), "positions": torch.zeros(2, 3, dtype=torch.long),
            "k_cache": _t(2, 2, 9, 8), "v_cache": _t(2, 2, 9, 8), "theta": theta}
    _agree(rotary._args_ok, rotary._check_args, args)


@pytest.mark.parametrize("grouped", [False, True])
@pytest.mark.parametrize("scales_shape", [(5,), (5, 2)])
@pytest.mark.parametrize("bias", [False, True])
def test_int8_linear_inputs(grouped, scales_shape, bias):
    args = {"x": _t(3, 6), "qweight": _t(5, 6, dtype=torch.int8), "scales": _t(*scales_shape),
            "bias": _t(5) if bias else None}
    def detailed(x, qweight, scales, bias):
        (int8._check_int8_linear if grouped else int8._check_w8a8_linear)(x, qweight, scales, bias)

    def fast(x, qweight, scales, bias):  # as int8_linear (grouped) and w8a8_linear (per channel) call it
        ok = int8._linear_inputs_ok(x, qweight, scales, bias, grouped=grouped)
        return ok if grouped else ok and qweight.shape[1] != 0

    if grouped or scales_shape == (5,):
        _agree(fast, detailed, args)


@pytest.mark.parametrize("mixed", [False, True])
@pytest.mark.parametrize("bias", [False, True])
def test_lora_inputs(mixed, bias):
    adapters = (3,) if mixed else ()
    args = {"x": _t(4, 6), "weight": _t(5, 6), "lora_a": _t(*adapters, 2, 6), "lora_b": _t(*adapters, 5, 2),
            "bias": _t(5) if bias else None}
    detailed = lora._check_mixed_inputs if mixed else lora._check_lora_inputs

    def fast(x, weight, lora_a, lora_b, bias):
        return lora._lora_inputs_ok(x, weight, lora_a, lora_b, bias, mixed=mixed)

    _agree(fast, detailed, args)


def test_cross_entropy_inputs():
    _agree(losses._inputs_ok, losses._check_inputs, {"logits": _t(4, 7), "targets": torch.zeros(4, dtype=torch.long)})
