"""LoRA linear layers (pytest-benchmark): fastlm's LoRA ops vs PEFT's LoRA layer, and mixed-adapter
batches.

``test_lora_linear`` — y = x·Wᵀ + s·(x·Aᵀ)·Bᵀ forward + backward (``torch.autograd.grad`` of y for
a fixed upstream gradient, W frozen: gradients for x, A and B), x (M, K), W (N, K), A (r, K),
B (N, r), s = 2. CUDA: the seven linears of a Llama-7B block (q, k, v, o: 4096→4096; gate, up:
4096→11008; down: 11008→4096), M = 4096 tokens, r = 16, bf16. CPU: q 128→128, up 128→344,
down 344→128, M = 256, r = 8, fp32 (quick: q only). One group per projection, cases
``triton`` (fused kernels, CUDA only), ``reference`` (fastlm's plain-PyTorch backend) and
``peft`` (``peft.tuners.lora.Linear`` around an ``nn.Linear``, built through PEFT's public API,
same weights): the peer. ``flops`` = the useful FLOPs 4·M·K·N + 6·M·r·(K + N); ``peak_mb`` from
the fixture (memory allocated during one fwd+bwd above what existed before); fastlm cases record
``max_abs_diff_vs_peft`` of the forward output. ``test_lora_block`` (not in quick CPU runs):
the same for all projections of the block in one call.

``test_lora_mixed`` — forward (no grad) of one projection K = N = 4096 (CPU: 128), r = 16
(CPU: 8), serving a batch whose rows use 1, 4, 8 or 16 different adapters (CPU: 1, 4):
(rows × seq) = 32 × 128 (prefill) and 64 × 1 (decode) tokens on CUDA (quick: prefill), 8 × 16 on
CPU. One group per (shape, adapters): ``F.linear`` (the frozen linear alone), fastlm's
``lora_linear_mixed`` on each backend (``validate=False``: the indices are built valid, as
fastlm.peft's serving path calls it) and PEFT's mixed batch (``adapter_names=``): the peer.
``tokens`` per call (tokens/s); ``vs_single_adapter`` = this time / the same impl's time with one
adapter (the issue's target: ≤ 1.25 at 8 adapters) and ``vs_base_linear`` = this time / the
frozen linear's, both from earlier cases of the same run (the cases run in that order).

On CPU the Triton interpreter is not a performance measurement: ``triton`` cases skip. GPU
figures are only ever measured, never estimated.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from bench.conftest import DEVICE, QUICK
from fastlm import ops, use_backend

GPU = DEVICE == "cuda"
DTYPE = torch.bfloat16 if GPU else torch.float32
DTYPE_NAME = str(DTYPE).removeprefix("torch.")
LLAMA_7B_BLOCK = (("q_proj", 4096, 4096), ("k_proj", 4096, 4096), ("v_proj", 4096, 4096), ("o_proj", 4096, 4096),
                  ("gate_proj", 4096, 11008), ("up_proj", 4096, 11008), ("down_proj", 11008, 4096))
CPU_BLOCK = (("q_proj", 128, 128), ("up_proj", 128, 344), ("down_proj", 344, 128))
M, R = (4096, 16) if GPU else (256, 8)
SCALE = 2.0
BLOCK = LLAMA_7B_BLOCK if GPU else CPU_BLOCK
PROJECTIONS = BLOCK[:1] if QUICK and not GPU else BLOCK
BLOCK_NAME = "Llama-7B" if GPU else "tiny"
IMPLS = ("triton", "reference", "peft")

MIXED_SIZE = 4096 if GPU else 128
MIXED_SHAPES = ([(32, 128), (64, 1)][:1 if QUICK else 2]) if GPU else [(8, 16)]
MIXED_COUNTS = (1, 4, 8, 16) if GPU else (1, 4)
MIXED_IMPLS = ("F.linear", "triton", "reference", "peft")


def _skip_unmeasured(impl: str) -> None:
    """Skip, with the reason, an impl this run does not measure."""
    if impl == "peft":
        pytest.importorskip("peft", reason="PEFT is the peer: pip install peft")
    elif impl in ("triton", "reference", "cuda"):
        ok, why = ops.backend_status(impl, DEVICE)
        if not ok:
            pytest.skip(f"{impl} backend unavailable: {why}")
        if impl != "reference" and not GPU:
            pytest.skip("Triton interpreter: not a performance measurement")


class _Holder(torch.nn.Module):
    def __init__(self, linear: torch.nn.Linear) -> None:
        super().__init__()
        self.proj = linear

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


def peft_linear(weight: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, r: int, alpha: float,
                names: list[str] | None = None) -> torch.nn.Module:
    """PEFT's LoRA layer around a frozen nn.Linear holding ``weight``, built through PEFT's public
    API (get_peft_model / add_adapter); adapter i of ``names`` gets lora_a[i] (r, K), lora_b[i] (N, r)."""
    import peft

    base = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=False, device=weight.device, dtype=weight.dtype)
    base.weight.data = weight
    names = names or ["default"]
    config = peft.LoraConfig(r=r, lora_alpha=alpha, target_modules=["proj"])
    model = peft.get_peft_model(_Holder(base), config, adapter_name=names[0])
    for name in names[1:]:
        model.add_adapter(name, config)
    layer = model.base_model.model.proj
    for i, name in enumerate(names):
        layer.lora_A[name].weight.data = lora_a[i].clone()
        layer.lora_B[name].weight.data = lora_b[i].clone()
        layer.lora_A[name].weight.requires_grad_(True)
        layer.lora_B[name].weight.requires_grad_(True)
    return layer


# ---- single adapter, forward + backward ---------------------------------------------------------


def linear_case(k: int, n: int, impl: str, seed: int = 0) -> tuple[Callable[[torch.Tensor], torch.Tensor], dict]:
    """(forward, tensors) of one projection for ``impl``: forward(x) -> (M, N); tensors holds x
    (M, K, requires grad), the upstream gradient and the trainable parameters [A, B]."""
    torch.manual_seed(seed)
    x = torch.randn(M, k, device=DEVICE, dtype=DTYPE, requires_grad=True)
    weight = torch.randn(n, k, device=DEVICE, dtype=DTYPE) * k**-0.5
    lora_a = (torch.randn(1, R, k, device=DEVICE) * k**-0.5).to(DTYPE)
    lora_b = (torch.randn(1, n, R, device=DEVICE) * 0.01).to(DTYPE)
    grad = torch.randn(M, n, device=DEVICE, dtype=DTYPE)
    if impl == "peft":
        layer = peft_linear(weight, lora_a, lora_b, R, SCALE * R)
        return layer, dict(x=x, grad=grad, params=[layer.lora_A["default"].weight, layer.lora_B["default"].weight])
    a, b = lora_a[0].clone().requires_grad_(), lora_b[0].clone().requires_grad_()

    def forward(x):
        with use_backend(impl):
            return ops.lora_linear(x, weight, a, b, SCALE)

    return forward, dict(x=x, grad=grad, params=[a, b])


def _fwd_bwd(forward, t: dict) -> Callable[[], object]:
    return lambda: torch.autograd.grad(forward(t["x"]), [t["x"], *t["params"]], t["grad"])


def _diff_vs_peft(forward, t: dict, k: int, n: int) -> dict:
    """max |fastlm forward − PEFT forward| on the same weights and x (empty without PEFT)."""
    try:
        import peft  # noqa: F401
    except ImportError:
        return {}
    peer, _ = linear_case(k, n, "peft")
    with torch.no_grad():
        return {"max_abs_diff_vs_peft": float((forward(t["x"]).float() - peer(t["x"]).float()).abs().max())}


def _flops(k: int, n: int) -> float:
    return float(4 * M * k * n + 6 * M * R * (k + n))


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("name,k,n", PROJECTIONS, ids=[p[0] for p in PROJECTIONS])
def test_lora_linear(measure, name, k, n, impl):
    _skip_unmeasured(impl)
    forward, t = linear_case(k, n, impl)
    info = {} if impl == "peft" else _diff_vs_peft(forward, t, k, n)
    measure(_fwd_bwd(forward, t), group=f"lora_linear fwd+bwd {name} M{M} K{k} N{n} r{R} {DTYPE_NAME}", impl=impl,
            peer="peft", flops=_flops(k, n), projection=name, dtype=DTYPE_NAME, **info)
    if GPU:
        torch.cuda.empty_cache()


@pytest.mark.skipif(QUICK and not GPU, reason="quick CPU run: one projection only")
@pytest.mark.parametrize("impl", IMPLS)
def test_lora_block(measure, impl):
    _skip_unmeasured(impl)
    steps = [_fwd_bwd(*linear_case(k, n, impl, seed=i)) for i, (_, k, n) in enumerate(BLOCK)]

    def block():
        for step in steps:
            step()

    measure(block, group=f"lora_linear fwd+bwd block ({BLOCK_NAME}: {len(BLOCK)} projections) M{M} r{R} {DTYPE_NAME}",
            impl=impl, peer="peft", flops=sum(_flops(k, n) for _, k, n in BLOCK), dtype=DTYPE_NAME)
    del steps
    if GPU:
        torch.cuda.empty_cache()


# ---- mixed adapters, forward --------------------------------------------------------------------

_MEDIANS: dict[tuple, float] = {}  # (rows, seq, adapters, impl) -> median seconds, for the ratios


def mixed_case(rows: int, seq: int, count: int, impl: str) -> Callable[[], torch.Tensor]:
    """The forward of ``impl`` on x (rows, seq, K) where row i uses adapter i mod count -> (rows, seq, N)."""
    k = n = MIXED_SIZE
    torch.manual_seed(0)
    x = torch.randn(rows, seq, k, device=DEVICE, dtype=DTYPE)
    weight = torch.randn(n, k, device=DEVICE, dtype=DTYPE) * k**-0.5
    lora_a = (torch.randn(count, R, k, device=DEVICE) * k**-0.5).to(DTYPE)
    lora_b = (torch.randn(count, n, R, device=DEVICE) * 0.01).to(DTYPE)
    row_adapter = torch.arange(rows, device=DEVICE) % count  # every adapter in the batch
    if impl == "F.linear":
        return torch.no_grad()(lambda: torch.nn.functional.linear(x, weight))
    if impl == "peft":
        names = [f"a{i}" for i in range(count)]
        layer = peft_linear(weight, lora_a, lora_b, R, SCALE * R, names)
        layer.set_adapter(names[0])
        row_names = [names[i] for i in row_adapter.tolist()]
        return torch.no_grad()(lambda: layer(x, adapter_names=row_names))
    scales = torch.full((count,), SCALE, device=DEVICE)
    index = row_adapter[:, None].expand(rows, seq)

    @torch.no_grad()
    def call():
        with use_backend(impl):
            return ops.lora_linear_mixed(x, weight, lora_a, lora_b, scales, index, validate=False)

    return call


MIXED = [(rows, seq, count, impl) for rows, seq in MIXED_SHAPES for count in MIXED_COUNTS for impl in MIXED_IMPLS]


@pytest.mark.parametrize("rows,seq,count,impl", MIXED, ids=[f"{r}x{s}-a{c}-{i}" for r, s, c, i in MIXED])
def test_lora_mixed(measure, rows, seq, count, impl):
    _skip_unmeasured(impl)
    fn = mixed_case(rows, seq, count, impl)
    k = n = MIXED_SIZE
    measure(fn, group=f"lora_linear_mixed fwd M{rows * seq} ({rows}x{seq}) K{k} N{n} r{R} adapters{count} "
                      f"{DTYPE_NAME}", impl=impl, peer="peft", tokens=rows * seq, adapters=count, dtype=DTYPE_NAME)
    median = measure.benchmark.stats.stats.median
    _MEDIANS[(rows, seq, count, impl)] = median
    extra = measure.benchmark.extra_info
    if (rows, seq, 1, impl) in _MEDIANS:
        extra["vs_single_adapter"] = median / _MEDIANS[(rows, seq, 1, impl)]
    if impl != "F.linear" and (rows, seq, count, "F.linear") in _MEDIANS:
        extra["vs_base_linear"] = median / _MEDIANS[(rows, seq, count, "F.linear")]
    if GPU:
        torch.cuda.empty_cache()
