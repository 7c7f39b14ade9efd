"""The same model and ops on a CUDA device as on CPU (run on a GPU machine by bench/gpu.sh)."""

import pytest
import torch

import fastlm
from fastlm import Model, ModelConfig, ops

pytestmark = pytest.mark.gpu

CONFIG = ModelConfig(arch="llama", vocab_size=211, hidden_size=96, num_layers=2, num_heads=6, num_kv_heads=2,
                     max_position_embeddings=128)


def test_auto_backend_runs_every_op_on_cuda():
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 6, 37, 40), torch.randn(2, 2, 37, 40), torch.randn(2, 2, 37, 40)
    expected = ops.attention(q, k, v, causal=True)
    out = ops.attention(q.cuda(), k.cuda(), v.cuda(), causal=True)
    torch.testing.assert_close(out.cpu(), expected, atol=1e-4, rtol=1e-4)
    logits = torch.randn(4, 1000, device="cuda")
    tokens = ops.sample(logits, top_k=5, top_p=0.9, generator=torch.Generator("cuda").manual_seed(0))
    assert tokens.device.type == "cuda" and tokens.shape == (4,)


def test_model_on_cuda_matches_cpu():
    torch.manual_seed(0)
    model = Model(CONFIG).eval()
    ids = torch.randint(0, 211, (3, 29))
    with torch.no_grad():
        expected = model(ids)
        gpu = model.cuda()
        torch.testing.assert_close(gpu(ids.cuda()).cpu(), expected, atol=1e-4, rtol=1e-4)
        out = fastlm.generate(gpu, ids[:, :5].cuda(), max_new_tokens=16)
        assert out.shape == (3, 21) and out.device.type == "cuda"


def test_bf16_training_step_on_cuda():
    torch.manual_seed(0)
    model = Model(CONFIG).cuda().to(torch.bfloat16)
    ids = torch.randint(0, 211, (2, 33), device="cuda")
    loss = ops.cross_entropy(model(ids[:, :-1]).flatten(0, 1), ids[:, 1:].flatten())
    loss.backward()
    assert torch.isfinite(loss) and all(torch.isfinite(p.grad).all() for p in model.parameters())
