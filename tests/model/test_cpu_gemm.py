"""fastlm's AVX-512 skinny GEMM (csrc/cpu/skinny_gemm.cpp, fastlm.decoding.cpu_gemm): the panel
layout against its formula; products over odd shapes (rows across the 8-row register block,
columns across 16-column panels and pairs, odd K, bias, strided input) within twice the error
of sequential float32 sums of the float64 product; the registered op's schema and fake
(opcheck); every bad argument refused with what was expected; the switch and the reasons it
gives where it cannot run."""

from __future__ import annotations

import pytest
import torch

from fastlm.decoding import cpu_gemm

needs_kernel = pytest.mark.skipif(not cpu_gemm.available(), reason=f"fastlm's CPU GEMM: {cpu_gemm.status()[1]}")


def _sequential(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x @ Wᵀ (+ b) in float32, each dot product summed term by term in order."""
    out = torch.zeros(x.shape[0], weight.shape[0])
    for k in range(x.shape[1]):
        out = out + x[:, k, None] * weight[:, k]
    return out if bias is None else out + bias


@needs_kernel
@pytest.mark.parametrize("n, k", [(1, 1), (15, 37), (16, 40), (17, 96), (31, 129), (32, 8), (33, 37), (100, 200)])
def test_the_panels_hold_each_weight_column_in_order_and_zeros_past_n(n, k):
    weight = torch.randn(n, k)
    panels = cpu_gemm.pack_weight(weight)
    count = (n + 15) // 16
    assert panels.shape == (count, k, 16) and panels.is_contiguous()
    for col in range(count * 16):
        expected = weight[col] if col < n else torch.zeros(k)
        assert torch.equal(panels[col // 16, :, col % 16], expected)


@needs_kernel
@pytest.mark.parametrize("rows", [1, 3, 8, 9, 16, 17])
@pytest.mark.parametrize("n, k", [(1, 37), (16, 40), (17, 96), (33, 129), (100, 256)])
@pytest.mark.parametrize("bias", [False, True])
def test_products_are_within_twice_the_error_of_sequential_float32_sums(rows, n, k, bias):
    torch.manual_seed(rows * 1000 + n + k)
    weight = torch.randn(n, k) / k ** 0.5
    b = torch.randn(n) if bias else None
    x = torch.randn(rows, 2 * k)[:, ::2]  # strided, as a split of a fused projection
    exact = torch.nn.functional.linear(x.double(), weight.double(), None if b is None else b.double())
    ours = cpu_gemm.skinny_linear(x, cpu_gemm.pack_weight(weight), n, b)
    plain = _sequential(x, weight, b)
    assert ours.shape == (rows, n) and ours.dtype == torch.float32
    assert (ours.double() - exact).abs().max() <= 2 * (plain.double() - exact).abs().max() + 1e-7


@needs_kernel
def test_empty_products():
    weight = torch.randn(20, 0)
    bias = torch.randn(20)
    assert torch.equal(cpu_gemm.skinny_linear(torch.randn(3, 0), cpu_gemm.pack_weight(weight), 20, bias),
                       bias.expand(3, 20))
    assert torch.equal(cpu_gemm.skinny_linear(torch.randn(3, 0), cpu_gemm.pack_weight(weight), 20), torch.zeros(3, 20))
    assert cpu_gemm.skinny_linear(torch.randn(0, 5), cpu_gemm.pack_weight(torch.randn(20, 5)), 20).shape == (0, 20)


@needs_kernel
def test_the_registered_op_passes_opcheck():
    panels = cpu_gemm.pack_weight(torch.randn(40, 24))
    for args in [(torch.randn(3, 24), panels, 40, None), (torch.randn(9, 24), panels, 33, torch.randn(33))]:
        torch.library.opcheck(torch.ops.fastlm_cpu.skinny_linear.default, args)
    torch.library.opcheck(torch.ops.fastlm_cpu.pack_weight.default, (torch.randn(17, 5),))


@needs_kernel
@pytest.mark.parametrize("case, match", [
    ("x 3-D", "x must be a 2-D float32 CPU tensor"),
    ("x float64", "x must be a 2-D float32 CPU tensor"),
    ("panels 2-D", "packed must be pack_weight's contiguous float32"),
    ("panels strided", "packed must be pack_weight's contiguous float32"),
    ("K differs", "x has 23 columns but the weight 24"),
    ("n too large", "n=49 does not match 3 panels of 16"),
    ("n too small", "n=32 does not match 3 panels of 16"),
    ("bias length", r"bias must be float32 \(40\)"),
    ("bias float64", r"bias must be float32 \(40\)"),
])
def test_bad_arguments_say_what_was_expected(case, match):
    weight = torch.randn(40, 24)
    panels = cpu_gemm.pack_weight(weight)
    x, n, bias = torch.randn(3, 24), 40, None
    if case == "x 3-D":
        x = x[None]
    elif case == "x float64":
        x = x.double()
    elif case == "panels 2-D":
        panels = weight
    elif case == "panels strided":
        panels = panels.transpose(1, 2).contiguous().transpose(1, 2)
    elif case == "K differs":
        x = torch.randn(3, 23)
    elif case == "n too large":
        n = 49
    elif case == "n too small":
        n = 32
    elif case == "bias length":
        bias = torch.randn(39)
    elif case == "bias float64":
        bias = torch.randn(40, dtype=torch.float64)
    with pytest.raises(RuntimeError, match=match):
        cpu_gemm.skinny_linear(x, panels, n, bias)


@needs_kernel
@pytest.mark.parametrize("weight, match", [(torch.randn(4), "weight must be 2-D"),
                                           (torch.randn(4, 4, dtype=torch.float16), "weight must be float32")])
def test_pack_weight_refuses_what_it_cannot_pack(weight, match):
    with pytest.raises(RuntimeError, match=match):
        cpu_gemm.pack_weight(weight)


def test_the_switch_and_the_capability_are_reported(monkeypatch):
    monkeypatch.setenv(cpu_gemm.ENV_VAR, "0")
    assert cpu_gemm.status() == (False, f"switched off by {cpu_gemm.ENV_VAR}=0") and not cpu_gemm.available()
    monkeypatch.delenv(cpu_gemm.ENV_VAR)
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")
    usable, why = cpu_gemm.status()
    assert not usable and why == "the kernel needs AVX-512; this CPU's ATen capability is AVX2"


def test_a_missing_source_is_reported(monkeypatch, tmp_path):
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX512")
    monkeypatch.setattr(cpu_gemm, "SOURCE", tmp_path / "skinny_gemm.cpp")
    usable, why = cpu_gemm.status()
    assert not usable and why == f"its source {tmp_path / 'skinny_gemm.cpp'} is not there (an install without csrc/)"
