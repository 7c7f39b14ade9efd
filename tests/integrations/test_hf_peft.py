"""apply() on a PEFT LoRA model: LoRA layers through fastlm.ops.lora_linear, against PEFT's own
forward by the 2x rule; merge/unmerge, disabling and saving stay PEFT's."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file

import fastlm
import fastlm.integrations.transformers as fi
from tests.integrations.hf_models import batch, build
from tests.integrations.rule import assert_2x

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _peft(dtype=torch.float32, dropout=0.0, arch="llama"):
    model = get_peft_model(build(arch, attn="sdpa", dtype=dtype),
                           LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, target_modules=TARGETS))
    torch.manual_seed(5)
    with torch.no_grad():  # B starts at zero: give the adapter something to do
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(0.05 * torch.randn_like(p))
    return model


def _step(model, ids, mask, labels):
    model.train()
    model.zero_grad(set_to_none=True)
    loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_lora_patched_matches_peft_2x_rule(arch, dtype):
    ids, mask, labels = batch(padding="right")
    oracle, plain = _peft(torch.float64, arch=arch), _peft(dtype, arch=arch)
    patched = fi.apply(_peft(dtype, arch=arch))
    assert fi.patched_summary(patched)["patched"]["lora_linear"] == 2 * len(TARGETS)
    ref, base, out = (_step(m, ids, mask, labels) for m in (oracle, plain, patched))
    atol = 1e-6 if dtype == torch.float32 else 1e-3
    assert_2x(out[0], base[0], ref[0], atol=atol, what="loss")
    assert len(ref[1]) == 4 * len(TARGETS)  # only the LoRA A/B matrices train
    for n, g in ref[1].items():
        assert_2x(out[1][n], base[1][n], g, atol=atol * float(g.abs().max()), what=f"grad {n}")


def test_lora_fast_path_really_calls_fastlm_lora_linear(monkeypatch):
    calls = []
    original = fastlm.ops.lora_linear
    import fastlm.integrations.transformers.patch as patch_module

    def counting(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(patch_module.ops, "lora_linear", counting)
    model = fi.apply(_peft())
    ids, mask, labels = batch()
    _step(model, ids, mask, labels)
    assert len(calls) == 2 * len(TARGETS)


def test_merge_unmerge_disable_and_save_stay_peft(tmp_path):
    ids, mask, _ = batch()
    model = _peft().eval()
    with torch.no_grad():
        expected = model(input_ids=ids, attention_mask=mask).logits
        with model.disable_adapter():
            base_only = model(input_ids=ids, attention_mask=mask).logits
    model.save_pretrained(tmp_path / "plain")
    fi.apply(model)
    model.eval()
    keep = mask.bool()
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids, attention_mask=mask).logits[keep], expected[keep],
                                   rtol=1e-5, atol=2e-5)
        with model.disable_adapter():
            torch.testing.assert_close(model(input_ids=ids, attention_mask=mask).logits[keep], base_only[keep],
                                       rtol=1e-5, atol=2e-5)
        model.merge_adapter()
        torch.testing.assert_close(model(input_ids=ids, attention_mask=mask).logits[keep], expected[keep],
                                   rtol=1e-5, atol=2e-5)
        model.unmerge_adapter()
    model.save_pretrained(tmp_path / "patched")
    a = load_file(tmp_path / "plain" / "adapter_model.safetensors")
    b = load_file(tmp_path / "patched" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    fi.remove(model)
    with torch.no_grad():
        # PEFT's merge + unmerge rounds the base weights, so not bit-identical here (see test_hf_apply)
        torch.testing.assert_close(model(input_ids=ids, attention_mask=mask).logits, expected, rtol=0, atol=1e-6)


def test_lora_dropout_runs_peft_forward():
    """Dropout > 0 is not fused: those layers run PEFT's forward (same random mask draws)."""
    ids, mask, labels = batch()
    plain, patched = _peft(dropout=0.2), fi.apply(_peft(dropout=0.2))
    torch.manual_seed(0)
    a = _step(plain, ids, mask, labels)
    torch.manual_seed(0)
    b = _step(patched, ids, mask, labels)
    torch.testing.assert_close(b[0], a[0], rtol=1e-5, atol=1e-6)
