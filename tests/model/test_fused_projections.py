"""Fused projections: q/k/v in one attn.qkv_proj and gate/up in one mlp.gate_up_proj (one GEMM
each) give the outputs of separate projections with the same weights, for every MLP and
attention variant; the forward makes one matmul for q/k/v and one for gate/up; the swiglu op
reads the two halves of the fused output in place."""

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import fastlm
from fastlm import ops
from fastlm.model import packed_modules

BASE = dict(vocab_size=97, hidden_size=64, num_layers=2, num_heads=4, intermediate_size=80,
            max_position_embeddings=64)
VARIANTS = {  # every projection layout the families use
    "llama": dict(arch="llama", num_kv_heads=2),  # GQA, gated silu (swiglu)
    "qwen2": dict(arch="qwen2", num_kv_heads=2, qkv_bias=True),  # q/k/v bias
    "qwen3": dict(arch="qwen3", num_kv_heads=2, qk_norm="head"),  # q/k RMSNorm per head
    "olmo2": dict(arch="olmo2", num_kv_heads=4, qk_norm="proj", norm_placement="post"),  # q/k norm over H·D
    "gemma": dict(arch="gemma2", num_kv_heads=1, head_dim=32, activation="gelu_tanh", norm="rms_offset",
                  norm_placement="sandwich", scale_embeddings=True),  # gated gelu, head_dim != hidden / heads
    "mlp_bias": dict(arch="llama", num_kv_heads=2, attention_bias=True, mlp_bias=True),
    "gpt2": dict(arch="gpt2"),  # plain (non-gated) MLP, learned positions, LayerNorm, biases
}


def _model(name, seed=0):
    torch.manual_seed(seed)
    model = fastlm.Model(fastlm.ModelConfig(**{**BASE, **VARIANTS[name]})).eval()
    with torch.no_grad():  # every parameter perturbed: a dropped bias or norm shows
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


class _Separate(nn.Module):
    """The unfused form: one nn.Linear per projection, outputs concatenated."""

    def __init__(self, fused: nn.Linear, rows: list[tuple[int, int]]) -> None:
        super().__init__()
        self.parts = nn.ModuleList()
        for start, stop in rows:
            part = nn.Linear(fused.in_features, stop - start, bias=fused.bias is not None)
            with torch.no_grad():
                part.weight.copy_(fused.weight[start:stop])
                if fused.bias is not None:
                    part.bias.copy_(fused.bias[start:stop])
            self.parts.append(part)

    def forward(self, x):
        return torch.cat([p(x) for p in self.parts], dim=-1)


def _unfused(model):
    for name, parts in packed_modules(model).items():
        parent, _, child = name.rpartition(".")
        fused = model.get_submodule(name)
        setattr(model.get_submodule(parent), child, _Separate(fused, [(a, b) for _, a, b in parts]))
    return model


@pytest.mark.parametrize("name", list(VARIANTS))
def test_fused_equals_separate_projections(name):
    fused = _model(name)
    separate = _unfused(_model(name))
    ids = torch.randint(0, 97, (2, 13), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = separate(ids)
        got = fused(ids)
        torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)
        if name in ("llama", "qwen3", "gpt2"):  # decoding through the cache too
            out_f = fastlm.generate(fused, ids[:, :5], max_new_tokens=3)
            out_s = fastlm.generate(separate, ids[:, :5], max_new_tokens=3)
            assert torch.equal(out_f, out_s)
    # gradients: the fused weight's row blocks get the separate projections' gradients
    fused.train()
    separate.train()
    fused(ids).float().pow(2).mean().backward()
    separate(ids).float().pow(2).mean().backward()
    for module_name, parts in packed_modules(fused).items():
        grad = fused.get_submodule(module_name).weight.grad
        reference = torch.cat([p.weight.grad for p in separate.get_submodule(module_name).parts])
        torch.testing.assert_close(grad, reference, rtol=1e-5, atol=1e-6)


def test_packed_modules_names_and_rows():
    model = _model("llama")
    packed = packed_modules(model)
    assert packed["layers.0.attn.qkv_proj"] == (("layers.0.attn.q_proj", 0, 64), ("layers.0.attn.k_proj", 64, 96),
                                                 ("layers.0.attn.v_proj", 96, 128))
    assert packed["layers.1.mlp.gate_up_proj"] == (("layers.1.mlp.gate_proj", 0, 80), ("layers.1.mlp.up_proj", 80, 160))
    assert set(packed_modules(_model("gpt2"))) == {"layers.0.attn.qkv_proj", "layers.1.attn.qkv_proj"}  # plain MLP


class _CountMatmuls(TorchDispatchMode):
    """Records the shape of the weight operand of every 2-D matmul (mm, addmm) run."""

    def __init__(self):
        super().__init__()
        self.shapes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in (torch.ops.aten.mm.default, torch.ops.aten.addmm.default):
            self.shapes.append(tuple(args[-1].shape))
        return func(*args, **kwargs)


@pytest.mark.parametrize("t", [1, 7])
def test_one_matmul_for_qkv_and_one_for_gate_up(t):
    model = _model("llama")
    ids = torch.randint(0, 97, (3, t), generator=torch.Generator().manual_seed(2))
    with torch.no_grad(), _CountMatmuls() as mode:
        model(ids)
    per_layer = {(64, 128): "qkv", (64, 160): "gate_up", (64, 64): "o", (80, 64): "down"}
    names = [per_layer.get(s, s) for s in mode.shapes]
    assert names.count("qkv") == 2 and names.count("gate_up") == 2, names  # one each per layer
    assert names.count("o") == 2 and names.count("down") == 2, names
    assert (64, 32) not in mode.shapes and (64, 80) not in mode.shapes, names  # no separate k/v, gate/up GEMM


def test_swiglu_reads_the_halves_of_the_fused_output_in_place():
    """gate and up are strided views of the (…, 2I) GEMM output; the op takes them as they are
    (the reference and the Triton kernel both accept a row stride ≠ I), with no copy."""
    fused = torch.randn(2, 5, 2 * 24)
    gate, up = fused.split(24, dim=-1)
    assert not gate.is_contiguous() and gate.data_ptr() == fused.data_ptr()
    with _Copies() as mode:
        out = ops.swiglu(gate, up)
    assert mode.copies == [], mode.copies
    torch.testing.assert_close(out, torch.nn.functional.silu(gate) * up, rtol=0, atol=0)


class _Copies(TorchDispatchMode):
    """Records copies/contiguous calls (aten.clone, aten.copy_, aten._to_copy)."""

    def __init__(self):
        super().__init__()
        self.copies = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in (torch.ops.aten.clone.default, torch.ops.aten.copy_.default, torch.ops.aten._to_copy.default):
            self.copies.append(str(func))
        return func(*args, **(kwargs or {}))
