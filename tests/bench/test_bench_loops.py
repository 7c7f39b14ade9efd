"""bench/bench_decode.py and bench/bench_training.py helpers: the turns, the bytes a decode step
reads, the training groups' loss agreement with transformers, and a step that trains."""

from __future__ import annotations

import pytest
import torch

import fastlm
from bench import bench_decode, bench_training


def test_in_turns_alternates_and_keeps_the_last_outputs():
    calls = []

    def impl(name):
        def fn():
            calls.append(name)
            return len(calls)
        return fn

    seconds, outputs = bench_decode.in_turns({"a": impl("a"), "b": impl("b")}, turns=3)
    assert calls == ["a", "b"] * 3
    assert outputs == {"a": 5, "b": 6}
    assert all(len(v) == 3 and min(v) >= 0 for v in seconds.values())


def test_bytes_per_step_counts_weights_and_the_mean_kv_cache():
    config = fastlm.preset("tiny")
    params = 1000
    got = bench_decode.bytes_per_step(config, params, batch=2, prompt_len=10, new=4, dtype=torch.bfloat16)
    kv = 2 * config.num_layers * 2 * config.num_kv_heads * config.head_dim * (10 + 2) * 2
    assert got == params * 2 + kv
    assert bench_decode.bytes_per_step(config, params, 2, 10, 4, torch.float32) == 2 * got


def test_decode_cases_have_the_transformers_peer():
    assert bench_decode.PEER in bench_decode.IMPLS and bench_decode.IMPLS[0] == "fastlm"
    assert all(batch * new > 0 for _, batch, _, new in bench_decode.SHAPES)


@pytest.mark.parametrize("preset", ["tiny", "tiny-gpt2"])  # GPT-2: transformers' default dropout must be off
def test_training_group_losses_agree_and_a_step_trains(preset):
    group = bench_training.Group(preset, 2, 8)  # asserts the fp32 loss agreement itself
    assert set(group.loss_diff) == set(bench_training.IMPLS) and max(group.loss_diff.values()) < 1e-3
    assert group.speedup_in_turns["transformers"] == 1.0 and min(group.speedup_in_turns.values()) > 0
    assert group.info["tokens"] == 16 and group.info["flops"] == 16 * group.flops_per_token > 0
    for impl in bench_training.IMPLS:
        model = group.hf if impl == "transformers" else group.model
        before = [p.detach().clone() for p in model.parameters()]
        group.step_fn(impl)()
        changed = sum(not torch.equal(b, p) for b, p in zip(before, model.parameters()))
        assert changed > len(before) // 2, f"{impl}: AdamW moved {changed} of {len(before)} tensors"
        assert all(p.grad is None for p in model.parameters())


def test_decode_gemm_groups_run_the_models_linears():
    from bench import bench_decode_gemm

    model = fastlm.Model(fastlm.preset("tiny"))
    step = [m.weight.shape for m in model.modules() if isinstance(m, torch.nn.Linear)]
    assert sorted(bench_decode_gemm.linear_shapes("tiny")) == sorted(tuple(s) for s in step)
    group = bench_decode_gemm.Group("tiny", 2)  # asserts every packed GEMM agrees with mm itself
    assert group.bytes == sum(s.numel() for s in step) * 4
    outputs = group.calls["mm"]()
    assert [tuple(o.shape) for o in outputs] == [(2, out) for out, _ in bench_decode_gemm.linear_shapes("tiny")]
    assert bench_decode_gemm.PEER == bench_decode_gemm.IMPLS[0] and set(group.calls) <= set(bench_decode_gemm.IMPLS)
