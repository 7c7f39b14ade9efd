"""Dispatch overhead of every fastlm op (pytest-benchmark).

    python -m pytest bench/bench_dispatch.py --benchmark-only --benchmark-json=/tmp/dispatch.json
    python bench/bench_dispatch.py /tmp/dispatch.json bench/results/cpu/dispatch.md   # the table
    python -m bench.report /tmp/dispatch.json      # the suite's per-group tables (vs_peer = vs reference)

For every op defined in the registry (fastlm.ops.registry.defined_ops: a new op without a case
here fails ``test_every_op_has_a_case``), on tiny CPU tensors, in one run:

- ``public`` / ``reference``: ``fastlm.ops.<op>(...)`` against what it ends in, called directly:
  the function the reference backend runs (``run()``'s ``entry.reference``: the op's eager
  reference, e.g. attention through SDPA) on the very arguments the public function passed to
  ``run()`` (recorded from one call), so the difference is the checks, ``run()`` and the cached
  backend decision — no arithmetic. Ops whose public function never reaches ``run()`` (the fused
  linear losses call their custom op directly) are compared with their unfused formula instead,
  and the table marks them;
- ``public`` / ``reference`` with autograd: the same with inputs that require grad, forward and
  backward (``out.sum().backward()``; the baseline's differentiable arguments are leaves);
- ``kernel-path``: the path a Triton/CUDA kernel call takes — the ``triton`` backend forced
  (available on CPU under ``TRITON_INTERPRET=1``) with the function the reference backend runs
  registered as its "kernel" (and the reference backward formula as its backward kernel). Without
  autograd its baseline is ``reference`` (the same function called directly); with autograd it is
  ``function`` (alone in group ``<op>-function-grad``; in group ``<op>-grad`` the kernel path's
  peer stays ``reference``, whose backward is autograd's): a minimal hand-written
  ``torch.autograd.Function`` calling the same forward and backward kernels directly — what a
  kernel call with autograd costs without fastlm's dispatch.

Each case goes through bench/conftest.py's ``measure``: group ``<op>-nograd`` / ``<op>-grad`` /
``<op>-function-grad``, ``impl`` = the path, ``op`` and ``grad`` in extra_info. The added cost of a
path is its time minus its baseline's in the same run (``write_table`` uses the minimum over
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


def _run_args(op, grad):
    """(the arguments the public function passes to ``run()`` for ``op``, what the reference
    backend's function returned), recorded from one call on this case's inputs; None when it does
    not reach ``run()`` exactly once. With ``grad``, the differentiable arguments that required
    grad become fresh leaves (so a baseline's backward stops at them)."""
    entry, seen = registry._DEFINED[op], []
    function = entry.reference

    def record(*args):
        out = function(*args)
        seen.append((args, out))
        return out

    entry.reference = record
    try:
        CASES[op][1](*_inputs(op, grad))
    finally:
        entry.reference = function
    if len(seen) != 1:
        return None
    leaves = set(entry.differentiable) if grad else set()
    args, out = seen[0]
    return [a.detach().requires_grad_(i in leaves and a.requires_grad) if isinstance(a, torch.Tensor) else a
            for i, a in enumerate(args)], out


def _direct(op):
    """What the reference backend runs for ``op``, output as ``run()`` returns it."""
    entry = registry._DEFINED[op]
    return (lambda *args: entry.reference(*args)[0]) if entry.reference_aux else entry.reference


class _HandWritten(torch.autograd.Function):
    """A kernel with autograd as one would write it by hand: the forward and backward kernels
    called directly (no checks, no backend decision): the kernel path's baseline with autograd."""

    @staticmethod
    def forward(ctx, forward, backward, spec, *args):
        out = forward(*args)
        outputs = tuple(out) if spec.outputs_to_backward else ()
        ctx.backward, ctx.spec, ctx.num_outputs = backward, spec, len(outputs)
        ctx.slots = [_TENSOR if isinstance(a, torch.Tensor) else a for a in args]
        ctx.save_for_backward(*(a for a in args if isinstance(a, torch.Tensor)), *outputs)
        if spec.auxiliary_outputs:
            ctx.mark_non_differentiable(*out[1:])
        return out

    @staticmethod
    def backward(ctx, grad, *aux_grads):
        saved = ctx.saved_tensors
        tensors = iter(saved[:len(saved) - ctx.num_outputs])
        args = [next(tensors) if slot is _TENSOR else slot for slot in ctx.slots]
        diff = ctx.spec.differentiable
        needs = [bool(ctx.needs_input_grad[i + 3]) and args[i] is not None for i in diff]
        grads = iter(ctx.backward(grad, *args, *saved[len(saved) - ctx.num_outputs:], needs))
        result = [None] * len(args)
        for i, need in zip(diff, needs):
            if args[i] is not None:
                g = next(grads)
                result[i] = g if need else None
        return (None, None, None, *result)


_TENSOR = object()


def _call(fn, args, grad):
    if not grad:
        return lambda: fn(*args)

    def step():
        out = fn(*args)
        (out[0] if isinstance(out, tuple) else out).sum().backward()

    return step


@pytest.fixture
def kernel_path(monkeypatch):
    """The triton backend forced, with the function the reference backend runs registered as its
    kernel and the reference backward as its backward kernel (a no-op-cost kernel path)."""
    def use(op):
        spec = registry.spec_of(op)
        monkeypatch.setitem(backend._KERNELS, (op, "triton"), registry._DEFINED[op].reference)
        if spec.differentiable:
            monkeypatch.setitem(backend._KERNELS, (f"{op}_backward", "triton"),
                                backend._KERNELS[(f"{op}_backward", "reference")])
        monkeypatch.setattr(backend._forced, "name", "triton")
    return use


def _bench(measure, op, grad, path, fn, group=None, **info):
    """One case through bench/conftest.py's ``measure``: group ``<op>-grad|nograd`` unless given,
    impl = the path; 100 warm-up calls (Python's adaptive interpreter and the allocator settle:
    with 5 the first cases of a run read up to 20 µs slow), then up to 2000 rounds of one call
    (50 with BENCH_QUICK; the table uses the minimum), no memory probe, no L2 flush (CPU tensors,
    also on a CUDA machine)."""
    group = group or f"{op}-{'grad' if grad else 'nograd'}"
    peers = {"public": "reference", "kernel-path": "reference", "public-noop": "noop",
             "kernel-path-noop": "function-noop" if grad else "noop"}
    peer = peers.get(path)
    measure(fn, group=group, impl=path, peer=peer, warmup=100, max_rounds=50 if QUICK else 2000, memory=False,
            flush_l2=False, op=op, grad=grad, **info)


KERNEL_OPS = [op for op in OPS if op not in ("fused_linear_cross_entropy", "attention_varlen", "attention")]
# fused_linear_cross_entropy always calls its custom op; attention_varlen's reference loops on the host;
# attention's eager reference (SDPA) returns no logsumexp, which a kernel of the op must.


def _paths(op: str, grad: bool) -> list[str]:
    """The cases of one op: the real paths, then (for an op whose public function reaches run())
    the no-op ones."""
    kernel = op in KERNEL_OPS
    if grad:
        paths = ["reference", "public"] + (["kernel-path"] if kernel else [])
        return paths + (["function", "function-noop", "kernel-path-noop"] if kernel and _reaches_run(op) else [])
    paths = ["reference", "public"] + (["kernel-path"] if kernel else [])
    return paths + (["noop", "public-noop"] + (["kernel-path-noop"] if kernel else []) if _reaches_run(op) else [])


def _reaches_run(op: str) -> bool:
    return op not in ("fused_linear_cross_entropy", "linear_logprobs", "linear_distillation_loss",
                      "linear_preference_loss")  # (they call their custom op: checked by test_dispatch)


# op-major: an op's baseline and paths run one after the other (cases far apart in a run drift apart)
DISPATCH_CASES = [(op, grad, path) for op in OPS for grad in (False, True) if not grad or CASES[op][3]
                  for path in _paths(op, grad)]


def _noop_kernels(op: str, recorded, grad: bool):
    """(forward, backward): no-op kernels of ``op`` returning what its reference kernels returned
    on the recorded run() arguments (the backward, with ``grad``: for the gradient of ``out.sum()``;
    else None)."""
    args, out = recorded
    out = tuple(t.detach() for t in out) if isinstance(out, tuple) else out.detach()

    def forward(*_):
        return out

    spec = registry.spec_of(op)
    if not grad:
        return forward, None
    main = out[0] if isinstance(out, tuple) else out
    needs = [a is not None and a.requires_grad for a in (args[i] for i in spec.differentiable)]
    outputs = tuple(out) if spec.outputs_to_backward else ()
    grads = backend._KERNELS[(f"{op}_backward", "reference")](torch.ones_like(main), *args, *outputs, needs)

    def backward(*_):
        return grads

    return forward, backward


@pytest.mark.parametrize("op, grad, path", DISPATCH_CASES,
                         ids=[f"{op}-{'grad' if grad else 'nograd'}-{path}" for op, grad, path in DISPATCH_CASES])
def test_dispatch(measure, kernel_path, monkeypatch, op, grad, path):
    """One path of one op: ``reference`` (the reference backend's function on run()'s arguments;
    the unfused formula where the public function does not reach run()), ``public``,
    ``kernel-path``, with autograd ``function`` (the same kernels through :class:`_HandWritten`);
    and the no-op cases (group ``<op>-noop`` / ``<op>-noop-grad``), where kernels that return
    recorded results stand in for the arithmetic: without autograd ``noop`` (called directly),
    ``public-noop`` (as the reference backend's function) and ``kernel-path-noop`` (as the forced
    triton kernel); with autograd ``function-noop`` and ``kernel-path-noop`` (forward and backward
    no-ops). A path's difference to its no-op baseline is the dispatch alone, free of the
    arithmetic's run-to-run noise."""
    recorded = _run_args(op, grad)
    assert recorded is not None or not _reaches_run(op), f"{op}: its public function no longer reaches run() once"
    public = _call(CASES[op][1], _inputs(op, grad), grad)
    spec = registry.spec_of(op)
    if path.endswith("noop"):
        args = recorded[0]
        forward, backward_kernel = _noop_kernels(op, recorded, grad)
        group = f"{op}-noop{'-grad' if grad else ''}"
        if path == "noop":
            call = _call(forward, args, False)
        elif path == "public-noop":
            monkeypatch.setattr(registry._DEFINED[op], "reference", forward)
            call = public
        elif path == "kernel-path-noop":
            kernel_path(op)
            monkeypatch.setitem(backend._KERNELS, (op, "triton"), forward)
            if grad:
                monkeypatch.setitem(backend._KERNELS, (f"{op}_backward", "triton"), backward_kernel)
            call = public
        else:  # function-noop
            call = _call(_hand_written(spec, forward, backward_kernel), args, True)
        return _bench(measure, op, grad, path, call, group=group)
    if path == "public":
        return _bench(measure, op, grad, path, public)
    if path == "kernel-path":
        kernel_path(op)
        return _bench(measure, op, grad, path, public)
    if path == "reference":
        if recorded is None:
            return _bench(measure, op, grad, path, _call(CASES[op][2], _inputs(op, grad), grad), baseline="formula")
        return _bench(measure, op, grad, path, _call(_direct(op), recorded[0], grad), baseline="run")
    forward, backward_kernel = registry._DEFINED[op].reference, backend._KERNELS[(f"{op}_backward", "reference")]
    _bench(measure, op, grad, path, _call(_hand_written(spec, forward, backward_kernel), recorded[0], True),
           group=f"{op}-function-grad")


def _hand_written(spec, forward, backward_kernel):
    """``forward`` and ``backward_kernel`` through :class:`_HandWritten`, output as run() returns it."""
    def call(*args):
        out = _HandWritten.apply(forward, backward_kernel, spec, *args)
        return out[0] if spec.auxiliary_outputs else out

    return call


def write_table(json_path: str, md_path: str, note: str = "") -> str:
    """The markdown table of a --benchmark-json run: per op, µs per call and added µs per path
    (minimum over rounds), the paths over the targets listed below it."""
    data = json.loads(open(json_path).read())
    best: dict[tuple[str, bool, str], float] = {}
    formula: set[str] = set()
    for b in data["benchmarks"]:
        if "bench_dispatch.py::" not in b.get("fullname", "bench_dispatch.py::"):
            continue  # a JSON of several modules: this module's cases only
        info = b["extra_info"]
        path = info.get("impl") or info["path"]  # "path": JSON written before the measure fixture
        best[(info["op"], info["grad"], path)] = b["stats"]["min"] * 1e6
        if info.get("baseline") == "formula":
            formula.add(info["op"])
    lines = [
        "# Dispatch overhead per call (CPU, tiny tensors)",
        "",
        f"Machine: {data['machine_info'].get('cpu', {}).get('brand_raw', '?')}, torch {torch.__version__}; "
        f"{note}",
        "",
        "µs per call: the minimum over the rounds (pytest-benchmark through bench/conftest.py's `measure`: up to 2000 "
        "rounds of one call; on a shared machine the minimum is the least disturbed estimate); `added` = the path "
        "− its baseline in the same run; `—`: not applicable.",
        "- `direct`: the function the reference backend runs, called on the arguments the public function passed "
        "to `run()` (no checks, no dispatch); † marks the ops whose public function does not reach `run()` (the "
        "fused linear losses call their custom op), compared with the unfused formula instead: their `added` is "
        "an algorithm's cost, not dispatch.",
        "- `kernel path`: the triton backend forced, with that same function as a no-op-cost kernel (what a "
        "GPU kernel call pays on the host); with autograd its baseline is `hand-written Function`: the same "
        "forward and backward kernels through a minimal `torch.autograd.Function`.",
        "- `added`, where the public function reaches `run()`: measured with no-op kernels in place of the "
        "arithmetic (they return the recorded results): without autograd the public path and the kernel path over "
        "calling the no-op directly; the kernel path with autograd over the hand-written Function with the same "
        "forward and backward no-ops — the checks and the dispatch alone, free of the arithmetic's run-to-run "
        "noise (several µs for the ops that take 40 µs or more). `public fwd+bwd` is timed with the real "
        "arithmetic: on the reference backend `run()` calls the function and autograd records its ops, so the "
        "public path adds no autograd work of its own (its dispatch is the column without autograd) and that "
        "column's `added` is mostly the arithmetic's noise (plus the backward of a reshape the public function "
        "makes).",
        "",
        "| op | direct | public (added) | kernel path (added) | direct fwd+bwd | public fwd+bwd (added) "
        "| kernel path fwd+bwd (added over the hand-written Function) |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    over: list[str] = []

    def cell(op, grad, path, base="reference"):
        ref, value = best.get((op, grad, base)), best.get((op, grad, path))
        if ref is None or value is None:
            return "—"
        added = value - ref
        noop, path_noop = best.get((op, grad, f"{base}-noop" if grad else "noop")), best.get((op, grad, f"{path}-noop"))
        if noop is not None and path_noop is not None:  # the dispatch alone, with a no-op function
            added = path_noop - noop
        if op not in formula and added > (15.0 if grad else 5.0) and not (grad and path == "public"):
            over.append(f"{op} {path}{' fwd+bwd' if grad else ''} +{added:.1f}")
        return f"{value:.1f} ({added:+.1f})"

    for op in sorted({k[0] for k in best}):
        ref, ref_g = best.get((op, False, "reference")), best.get((op, True, "reference"))
        lines.append(f"| {op}{' †' if op in formula else ''} | {ref:.1f} | {cell(op, False, 'public')} | "
                     f"{cell(op, False, 'kernel-path')} | {'—' if ref_g is None else f'{ref_g:.1f}'} | "
                     f"{cell(op, True, 'public')} | {cell(op, True, 'kernel-path', 'function')} |")
    lines += ["", "Over the targets (≤ 5 µs added without autograd, ≤ 15 µs with it; † ops and the real-arithmetic "
              "`public fwd+bwd` column aside): "
              + ("; ".join(over) if over else "none") + "."]
    text = "\n".join(lines) + "\n"
    with open(md_path, "w") as f:
        f.write(text)
    return text


if __name__ == "__main__":
    print(write_table(sys.argv[1], sys.argv[2], " ".join(sys.argv[3:])))
