"""Dispatch overhead of every fastlm op (pytest-benchmark).

    python -m pytest bench/bench_dispatch.py --benchmark-only --benchmark-json=/tmp/dispatch.json
    python bench/bench_dispatch.py /tmp/dispatch.json bench/results/cpu/dispatch.md   # the table
    python -m bench.report /tmp/dispatch.json      # the suite's per-group tables (vs_peer = vs reference)

For every op defined in the registry (fastlm.ops.registry.defined_ops: a new op without a case
here fails ``test_every_op_has_a_case``), on tiny CPU tensors, four timings in one group:

- ``public`` / ``reference``: ``fastlm.ops.<op>(...)`` against the op's reference called directly
  (the same arithmetic: on CPU the auto-selected backend is the reference), no autograd;
- ``public-grad`` / ``reference-grad``: the same with inputs that require grad, forward and
  backward (``out.sum().backward()``);
- ``kernel-path`` / ``kernel-path-grad``: the path a Triton/CUDA kernel call takes — the
  ``triton`` backend forced (available on CPU under ``TRITON_INTERPRET=1``) with the op's
  reference registered as its "kernel" (and its reference backward as the backward kernel), so
  the difference to ``reference``/``reference-grad`` is the dispatch from the public function to a
  kernel backend, no-op kernel aside.

Each case goes through bench/conftest.py's ``measure``: group ``<op>-nograd`` / ``<op>-grad``,
``impl`` = the path, ``peer`` = ``reference``, ``op`` and ``grad`` in extra_info. The added cost of
a path is its time minus the reference's in the same group (``write_table`` uses the minimum over
rounds: the least disturbed estimate on a shared machine).
Targets (issue 15): ≤ 5 µs added per call without autograd, ≤ 15 µs with it.
"""

from __future__ import annotations

import json
import os
import sys

os.environ.setdefault("TRITON_INTERPRET", "1")  # the triton backend on CPU (kernel-path timings)

import pytest  # noqa: E402
import torch  # noqa: E402

import fastlm  # noqa: E402
from bench.conftest import QUICK  # noqa: E402
from fastlm import ops  # noqa: E402
from fastlm.ops import backend, reference, registry  # noqa: E402
from fastlm.ops.attn import attention_sdpa  # noqa: E402

torch.manual_seed(0)
torch.set_num_threads(1)  # tiny tensors: intra-op threads only add noise on a shared machine


def _t(*shape):
    return torch.randn(*shape)


def _q8(out_f=6, in_f=8):
    return ops.quantize_int8(_t(out_f, in_f))


# op -> (inputs, public call, reference call, differentiable input positions). Tiny CPU tensors.
_CU = torch.tensor([0, 2, 5], dtype=torch.int32)
_TABLE = torch.tensor([[0, 1], [2, 3]], dtype=torch.int32)
_LENS = torch.tensor([3, 6])
_POS = torch.tensor([[0, 1], [2, 3]])
_QW, _QS = _q8()
_SAMPLE = (torch.ones(2), torch.full((2,), 7), torch.ones(2), torch.zeros(2))
_PREF_TOKENS = torch.tensor([[1, 2], [3, 4]])  # one pair (chosen, rejected) of two targets


def _dpo_unfused(h, w, t, m, ref, beta=0.1):
    """DPO's sigmoid loss summed over pairs, from the full logits (rows [chosen..., rejected...])."""
    logp = torch.log_softmax(h @ w.t(), -1).gather(-1, t.reshape(-1, 1)).view(t.shape)  # (2P, T)
    chosen, rejected = (logp * m).sum(-1).chunk(2)
    return -torch.nn.functional.logsigmoid(beta * ((chosen - ref[:, 0]) - (rejected - ref[:, 1]))).sum()

CASES = {
    "attention": ((_t(1, 2, 4, 8), _t(1, 1, 4, 8), _t(1, 1, 4, 8)),
                  lambda q, k, v: ops.attention(q, k, v, causal=True),
                  lambda q, k, v: attention_sdpa(q, k, v, True), (0, 1, 2)),  # what the reference backend runs
    "attention_varlen": ((_t(5, 2, 8), _t(5, 1, 8), _t(5, 1, 8)),
                         lambda q, k, v: ops.attention_varlen(q, k, v, _CU, _CU, max_seqlen_q=3, max_seqlen_k=3,
                                                              causal=True),
                         lambda q, k, v: reference.attention_varlen(q, k, v, _CU, _CU, 3, 3, True, None)[0],
                         (0, 1, 2)),
    "decode_attention": ((_t(2, 2, 1, 8), _t(2, 1, 6, 8), _t(2, 1, 6, 8)),
                         lambda q, k, v: ops.decode_attention(q, k, v, _LENS),
                         lambda q, k, v: reference.decode_attention(q, k, v, _LENS), ()),
    "decode_attention_paged": ((_t(2, 2, 1, 8), _t(4, 1, 4, 8), _t(4, 1, 4, 8)),
                               lambda q, k, v: ops.decode_attention_paged(q, k, v, _TABLE, _LENS),
                               lambda q, k, v: reference.decode_attention_paged(q, k, v, _TABLE, _LENS, None), ()),
    "rms_norm": ((_t(4, 16), _t(16)), ops.rms_norm, reference.rms_norm, (0, 1)),
    "layer_norm": ((_t(4, 16), _t(16), _t(16)), ops.layer_norm, reference.layer_norm, (0, 1, 2)),
    "rope": ((_t(1, 2, 4, 8), torch.arange(4)), ops.rope, reference.rope, (0,)),
    "rope_append_kv": ((_t(2, 2, 2, 8), _t(2, 1, 2, 8), _t(2, 1, 2, 8), _POS, torch.zeros(2, 1, 8, 8),
                        torch.zeros(2, 1, 8, 8)),
                       lambda q, k, v, p, kc, vc: ops.rope_append_kv(q, k, v, p, kc, vc, theta=1e4),
                       lambda q, k, v, p, kc, vc: reference.rope_append_kv(q, k, v, p, kc, vc, 1e4), ()),
    "swiglu": ((_t(4, 16), _t(4, 16)), ops.swiglu, reference.swiglu, (0, 1)),
    "gelu": ((_t(4, 16),), ops.gelu, reference.gelu, (0,)),
    "cross_entropy": ((_t(4, 16), torch.tensor([1, 2, -100, 3])),
                      lambda z, t: ops.cross_entropy(z, t, validate=False),  # validate: a host read
                      lambda z, t: reference.cross_entropy(z, t), (0,)),
    "lora_linear": ((_t(4, 8), _t(6, 8), _t(2, 8), _t(6, 2)),
                    lambda x, w, a, b: ops.lora_linear(x, w, a, b, 0.5),
                    lambda x, w, a, b: reference.lora_linear(x, w, a, b, 0.5), (0, 2, 3)),
    "lora_linear_mixed": ((_t(4, 8), _t(6, 8), _t(2, 2, 8), _t(2, 6, 2), torch.tensor([0.5, 1.0]),
                           torch.tensor([0, -1, 1, 0])),
                          lambda x, w, a, b, s, i: ops.lora_linear_mixed(x, w, a, b, s, i, validate=False),
                          lambda x, w, a, b, s, i: reference.lora_linear_mixed(x, w, a, b, s, i, None), (0, 2, 3)),
    "quantize_int8": ((_t(6, 8),), ops.quantize_int8, reference.quantize_int8, ()),
    "int8_linear": ((_t(4, 8), _QW, _QS), ops.int8_linear, reference.int8_linear, (0,)),
    "quantize_per_token": ((_t(4, 8),), ops.quantize_per_token, lambda x: reference.quantize_per_token(x, None), ()),
    "w8a8_linear": ((_t(4, 8), _QW, _QS), ops.w8a8_linear,
                    lambda x, q, s: reference.w8a8_linear(x, q, s, None, None), ()),
    "sample": ((_t(2, 7),), lambda z: ops.sample(z, check=False),
               lambda z: reference.sample(z, torch.rand(2, dtype=torch.float64), *_SAMPLE)[0], ()),
    "fused_linear_cross_entropy": ((_t(4, 8), _t(11, 8), torch.tensor([1, 2, -100, 3])),
                                   lambda h, w, t: ops.fused_linear_cross_entropy(h, w, t, validate=False),
                                   lambda h, w, t: torch.nn.functional.cross_entropy(h @ w.t(), t), (0, 1)),
    # The chunked alignment losses, against the unfused formula on full logits (as the fused CE).
    "linear_logprobs": ((_t(4, 8), _t(11, 8), torch.tensor([1, 2, 0, 3])),
                        lambda h, w, t: ops.linear_logprobs(h, w, t, validate=False),
                        lambda h, w, t: torch.log_softmax(h @ w.t(), -1).gather(-1, t[:, None]).squeeze(-1), (0, 1)),
    "linear_distillation_loss": ((_t(4, 8), _t(11, 8), _t(4, 6), _t(11, 6)),
                                 lambda hs, ws, ht, wt: ops.linear_distillation_loss(hs, ws, ht, wt, validate=False),
                                 lambda hs, ws, ht, wt: torch.nn.functional.kl_div(
                                     torch.log_softmax(hs @ ws.t(), -1), torch.log_softmax(ht @ wt.t(), -1),
                                     reduction="batchmean", log_target=True), (0, 1)),
    "linear_preference_loss": ((_t(4, 8), _t(11, 8), _PREF_TOKENS, torch.ones(2, 2, dtype=torch.bool),
                                torch.zeros(1, 2)),
                               lambda h, w, t, m, r: ops.linear_preference_loss(h, w, t, m, r, validate=False),
                               lambda h, w, t, m, r: _dpo_unfused(h, w, t, m, r), (0, 1)),
}
OPS = sorted(CASES)


def test_every_op_has_a_case():
    assert set(registry.defined_ops()) <= set(CASES), sorted(set(registry.defined_ops()) - set(CASES))


def _inputs(op, grad):
    inputs, _, _, diff = CASES[op]
    return [t.clone().requires_grad_(grad and i in diff) for i, t in enumerate(inputs)]


def _call(fn, args, grad):
    if not grad:
        return lambda: fn(*args)

    def step():
        out = fn(*args)
        (out[0] if isinstance(out, tuple) else out).sum().backward()

    return step


@pytest.fixture
def kernel_path(monkeypatch):
    """The triton backend forced, the reference registered as its kernel (a no-op kernel path)."""
    def use(op):
        spec = registry.spec_of(op)
        monkeypatch.setitem(backend._KERNELS, (op, "triton"), backend._KERNELS[(op, "reference")])
        if spec.differentiable:
            monkeypatch.setitem(backend._KERNELS, (f"{op}_backward", "triton"),
                                backend._KERNELS[(f"{op}_backward", "reference")])
    monkeypatch.setattr(backend._forced, "name", "triton")
    return use


def _bench(measure, op, grad, path, fn):
    """One case through bench/conftest.py's ``measure``: group ``<op>-grad|nograd``, impl = the path,
    peer = ``reference``; up to 200 rounds of one call (50 with BENCH_QUICK; the table uses the
    minimum), no memory probe, no L2 flush (CPU tensors, also on a CUDA machine)."""
    measure(fn, group=f"{op}-{'grad' if grad else 'nograd'}", impl=path, peer="reference", warmup=5,
            max_rounds=50 if QUICK else 200, memory=False, flush_l2=False, op=op, grad=grad)


@pytest.mark.parametrize("grad", [False, True], ids=["nograd", "grad"])
@pytest.mark.parametrize("op", OPS)
def test_reference(measure, op, grad):
    if grad and not CASES[op][3]:
        pytest.skip("not differentiable")
    _bench(measure, op, grad, "reference", _call(CASES[op][2], _inputs(op, grad), grad))


@pytest.mark.parametrize("grad", [False, True], ids=["nograd", "grad"])
@pytest.mark.parametrize("op", OPS)
def test_public(measure, op, grad):
    if grad and not CASES[op][3]:
        pytest.skip("not differentiable")
    _bench(measure, op, grad, "public", _call(CASES[op][1], _inputs(op, grad), grad))


KERNEL_OPS = [op for op in OPS if op not in ("fused_linear_cross_entropy", "attention_varlen", "attention")]
# fused_linear_cross_entropy always calls its custom op; attention_varlen's reference loops on the host;
# attention's registered reference kernel is the explicit formula, not the SDPA path it is compared with.


@pytest.mark.parametrize("grad", [False, True], ids=["nograd", "grad"])
@pytest.mark.parametrize("op", KERNEL_OPS)
def test_kernel_path(measure, kernel_path, op, grad):
    if grad and not CASES[op][3]:
        pytest.skip("not differentiable")
    kernel_path(op)
    _bench(measure, op, grad, "kernel-path", _call(CASES[op][1], _inputs(op, grad), grad))


def write_table(json_path: str, md_path: str, note: str = "") -> str:
    """The markdown table of a --benchmark-json run: per op, median µs and added µs per call."""
    data = json.loads(open(json_path).read())
    med: dict[tuple[str, bool, str], float] = {}
    for b in data["benchmarks"]:
        if "bench_dispatch.py::" not in b.get("fullname", "bench_dispatch.py::"):
            continue  # a JSON of several modules: this module's cases only
        info = b["extra_info"]
        path = info.get("impl") or info["path"]  # "path": JSON written before the measure fixture
        med[(info["op"], info["grad"], path)] = b["stats"]["min"] * 1e6
    lines = [
        "# Dispatch overhead per call (CPU, tiny tensors)",
        "",
        f"Machine: {data['machine_info'].get('cpu', {}).get('brand_raw', '?')}, torch {torch.__version__}; "
        f"{note}",
        "µs per call: the minimum over the rounds (pytest-benchmark through bench/conftest.py's `measure`: up to 200 "
        "rounds of one call; on a shared machine the minimum is",
        "the least disturbed estimate). `added` = path − reference in the same run. `—`: not applicable.",
        "`kernel-path`: triton forced with the reference as a no-op-cost kernel "
        "(what a GPU kernel call pays on the host).",
        "",
        "| op | reference | public (added) | kernel path (added) | reference fwd+bwd | public fwd+bwd (added) "
        "| kernel path fwd+bwd (added) |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]

    def cell(op, grad, path):
        ref, value = med.get((op, grad, "reference")), med.get((op, grad, path))
        return "—" if ref is None or value is None else f"{value:.1f} ({value - ref:+.1f})"

    for op in sorted({k[0] for k in med}):
        ref, ref_g = med.get((op, False, "reference")), med.get((op, True, "reference"))
        lines.append(f"| {op} | {ref:.1f} | {cell(op, False, 'public')} | {cell(op, False, 'kernel-path')} | "
                     f"{'—' if ref_g is None else f'{ref_g:.1f}'} | {cell(op, True, 'public')} | "
                     f"{cell(op, True, 'kernel-path')} |")
    text = "\n".join(lines) + "\n"
    with open(md_path, "w") as f:
        f.write(text)
    return text


if __name__ == "__main__":
    print(write_table(sys.argv[1], sys.argv[2], " ".join(sys.argv[3:])))
