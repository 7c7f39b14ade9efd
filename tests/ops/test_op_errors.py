"""Bad input to every op gets an error that says what is wrong and what was expected."""

import pytest
import torch

from fastlm import ops


def t(*shape, dtype=torch.float32, device="cpu"):
    return torch.zeros(*shape, dtype=dtype, device=device)


CASES = [
    (lambda: ops.attention(t(2, 4, 3, 8), t(2, 3, 3, 8), t(2, 3, 3, 8)), ValueError, "multiple of the 3 key/value heads"),
    (lambda: ops.attention(t(2, 4, 3, 8), t(1, 4, 3, 8), t(1, 4, 3, 8)), ValueError, "batch sizes differ"),
    (lambda: ops.attention(t(2, 4, 3, 8), t(2, 4, 3, 16), t(2, 4, 3, 16)), ValueError, "head dims differ"),
    (lambda: ops.attention(t(2, 4, 3, 8), t(2, 4, 3, 8), t(2, 4, 5, 8)), ValueError, "same shape"),
    (lambda: ops.attention(t(4, 3, 8), t(4, 3, 8), t(4, 3, 8)), ValueError, "expected q with 4 dims"),
    (lambda: ops.attention(t(1, 1, 3, 8), t(1, 1, 3, 8, dtype=torch.float16), t(1, 1, 3, 8)), TypeError, "one dtype"),
    (lambda: ops.attention(t(1, 1, 3, 8), t(1, 1, 3, 8, device="meta"), t(1, 1, 3, 8)), ValueError, "one device"),
    (lambda: ops.attention(t(1, 1, 3, 8, dtype=torch.int64), t(1, 1, 3, 8), t(1, 1, 3, 8)), TypeError, "floating-point q"),
    (lambda: ops.attention(t(2, 1, 3, 8), t(2, 1, 3, 8), t(2, 1, 3, 8), key_lens=torch.tensor([3])), ValueError,
     r"expected shape \(2,\)"),
    (lambda: ops.attention(t(1, 1, 3, 8), t(1, 1, 3, 8), t(1, 1, 3, 8), key_lens=torch.tensor([3.0])), TypeError,
     "int32 or int64"),
    (lambda: ops.decode_attention(t(2, 4, 1, 8), t(2, 2, 9, 8), t(2, 2, 9, 8), torch.tensor([1, 2, 3])), ValueError,
     r"expected shape \(2,\)"),
    (lambda: ops.rms_norm(t(3, 8), t(7)), ValueError, r"weight of shape \(8,\)"),
    (lambda: ops.layer_norm(t(3, 8), t(8), t(9)), ValueError, r"bias of shape \(8,\)"),
    (lambda: ops.rope(t(1, 2, 3, 7), torch.arange(3)), ValueError, "head dim must be even"),
    (lambda: ops.rope(t(1, 2, 3, 8), torch.arange(4)), ValueError, r"shape \(3,\) or \(1, 3\)"),
    (lambda: ops.rope(t(1, 2, 3, 8), torch.arange(3.0)), TypeError, "integer tensor"),
    (lambda: ops.swiglu(t(3, 8), t(3, 9)), ValueError, "shapes differ"),
    (lambda: ops.gelu(t(3, dtype=torch.int32)), TypeError, "floating-point x"),
    (lambda: ops.lora_linear(t(2, 6), t(5, 6), t(2, 7), t(5, 2), 1.0), ValueError, "inner dims differ"),
    (lambda: ops.lora_linear(t(2, 6), t(5, 6), t(2, 6), t(5, 3), 1.0), ValueError, r"lora_b of shape \(5, 2\)"),
    (lambda: ops.lora_linear(t(2, 6), t(5, 6), t(2, 6), t(5, 2), 1.0, t(4)), ValueError, r"bias of shape \(5,\)"),
    (lambda: ops.quantize_int8(t(5)), ValueError, "weight with 2 dims"),
    (lambda: ops.quantize_int8(torch.tensor([[1.0, float("nan")]])), ValueError, "NaN or infinite"),
    (lambda: ops.int8_linear(t(2, 6), t(5, 6), t(5)), TypeError, "qweight of dtype torch.int8"),
    (lambda: ops.int8_linear(t(2, 7), t(5, 6, dtype=torch.int8), t(5)), ValueError, "qweight expects 6"),
    (lambda: ops.int8_linear(t(2, 6), t(5, 6, dtype=torch.int8), t(4)), ValueError, r"scales of shape \(5,\)"),
    (lambda: ops.cross_entropy(t(3, 5), torch.tensor([0, 1])), ValueError, "3 rows of logits but 2 targets"),
    (lambda: ops.cross_entropy(t(2, 5), torch.tensor([0, 5])), ValueError, r"targets must be in \[0, 5\)"),
    (lambda: ops.cross_entropy(t(2, 5), torch.tensor([0.0, 1.0])), TypeError, "targets of dtype torch.int64"),
    (lambda: ops.attention("q", t(1, 1, 1, 1), t(1, 1, 1, 1)), TypeError, "expected q to be a torch.Tensor"),
]


@pytest.mark.parametrize("call,error,message", CASES, ids=[f"case{i}" for i in range(len(CASES))])
def test_bad_input_is_explained(call, error, message):
    with pytest.raises(error, match=message):
        call()
