"""fastlm's skinny float32 GEMM for the CPU decode step (csrc/cpu/skinny_gemm.cpp): y (M, N) =
x (M, K) · Wᵀ + bias for a few rows M, over a weight packed once into 16-column panels.

A decode step multiplies the batch's few rows by every weight of the model, so its GEMMs are
bound by streaming the weights, not by arithmetic. MKL's and oneDNN's packed GEMMs stream
them at a quarter to 70% of the speed of merely reading them on this project's CPU; the
kernel reads each pair of panels once, front to back, while up to 8 rows accumulate in AVX-512
registers: 1.4-2.3x faster than the better of the two over one decode step's linears
(:mod:`fastlm.decoding.packed` has the table, bench/results/cpu/bench_decode_gemm.md the run).

The kernel needs AVX-512 (ATen's CPU capability "AVX512") and a C++ compiler: it is built
on first use with ``torch.utils.cpp_extension`` (~10 s, cached across processes in torch's
extension directory) and registered as ``torch.ops.fastlm_cpu.pack_weight`` /
``torch.ops.fastlm_cpu.skinny_linear``. Where it cannot be built or run, :func:`status` says
why and decoding keeps to MKL's or oneDNN's packed GEMM. ``FASTLM_CPU_KERNELS=0`` switches it off.
"""

from __future__ import annotations

import functools
import logging
import os
import subprocess
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

SOURCE = Path(__file__).resolve().parent.parent.parent / "csrc" / "cpu" / "skinny_gemm.cpp"
ENV_VAR = "FASTLM_CPU_KERNELS"
#: rows up to which the kernel beats oneDNN's packed GEMM on this project's CPU (one sweep of a
#: 4M-parameter model's linears: 8 rows 1.9x, 16 rows 1.2x, 32 rows 1.03x: not worth a pack)
MAX_ROWS = 16
_FLAGS = ["-O3", "-mavx512f", "-mfma"]


def status() -> tuple[bool, str]:
    """(usable, why): whether :func:`skinny_linear` runs here; builds the kernel on first call."""
    if os.environ.get(ENV_VAR, "").strip().lower() in ("0", "false", "no", "off"):
        return False, f"switched off by {ENV_VAR}={os.environ[ENV_VAR]}"
    capability = torch.backends.cpu.get_cpu_capability()
    if capability != "AVX512":
        return False, f"the kernel needs AVX-512; this CPU's ATen capability is {capability}"
    return _build(SOURCE)


@functools.lru_cache(maxsize=None)
def _build(source: Path) -> tuple[bool, str]:
    if not source.is_file():
        return False, f"its source {source} is not there (an install without csrc/)"
    from torch.utils import cpp_extension

    logger.info("building fastlm's CPU GEMM from %s (first use; cached afterwards)", source)
    try:
        cpp_extension.load("fastlm_cpu_gemm", [str(source)], extra_cflags=_FLAGS, is_python_module=False)
    except (RuntimeError, OSError, subprocess.CalledProcessError, ImportError) as err:
        logger.warning("fastlm's CPU GEMM could not be built (%s); decoding uses oneDNN/MKL", err)
        return False, f"the build failed: {err}"
    torch.library.register_fake("fastlm_cpu::pack_weight")(_pack_weight_fake)
    torch.library.register_fake("fastlm_cpu::skinny_linear")(_skinny_linear_fake)
    return True, "built"


def _pack_weight_fake(weight):
    return weight.new_empty(((weight.shape[0] + 15) // 16, weight.shape[1], 16))


def _skinny_linear_fake(x, packed, n, bias):
    return x.new_empty((x.shape[0], n))


def available() -> bool:
    """Whether the kernel runs here (building it on first call)."""
    return status()[0]


def pack_weight(weight: torch.Tensor) -> torch.Tensor:
    """weight (N, K) float32 -> its panels (ceil(N/16), K, 16), columns past N zero."""
    return torch.ops.fastlm_cpu.pack_weight(weight)


def skinny_linear(x: torch.Tensor, packed: torch.Tensor, n: int, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x (M, K) float32 · Wᵀ (+ bias (N,)) -> (M, N), W given as :func:`pack_weight`'s panels."""
    return torch.ops.fastlm_cpu.skinny_linear(x, packed, n, bias)


def _frozen_linear(graph: torch.fx.Graph, node: torch.fx.Node):
    """(x, the constant's node, weight (N, K), bias or None) when ``node`` is a linear over a frozen weight that the
    kernel takes — ``mm(x, C)`` or ``addmm(b, x, C)`` with C a graph constant (inductor's
    freezing folds the weight's transpose into it: C = Wᵀ), x float32 (M ≤ MAX_ROWS, K) — else None."""
    aten = torch.ops.aten
    if node.op != "call_function" or node.kwargs:
        return None
    if node.target is aten.mm.default:
        (x, constant), bias = node.args, None
    elif node.target is aten.addmm.default:
        bias, x, constant = node.args
    else:
        return None
    if not (isinstance(constant, torch.fx.Node) and constant.op == "get_attr" and isinstance(x, torch.fx.Node)):
        return None
    weight = getattr(graph.owning_module, constant.target, None)
    x_val = x.meta.get("val")
    if (not isinstance(weight, torch.Tensor) or weight.dim() != 2 or weight.dtype != torch.float32
            or weight.device.type != "cpu" or x_val is None or x_val.dim() != 2 or x_val.dtype != torch.float32
            or x_val.shape[0] > MAX_ROWS):
        return None
    if bias is not None:
        b_val = bias.meta.get("val") if isinstance(bias, torch.fx.Node) else None
        if b_val is None or b_val.shape != (weight.shape[1],) or b_val.dtype != torch.float32:
            return None
    return x, constant, weight.t(), bias


def route_frozen_linears(graph: torch.fx.Graph) -> int:
    """Rewrite every linear of a frozen inductor graph that :func:`_frozen_linear` accepts into
    ``fastlm_cpu::skinny_linear`` over the weight's panels, packed now and kept on the graph
    module as a constant (one pack per weight). Returns how many it rewrote."""
    module, packs, count = graph.owning_module, {}, 0
    for node in list(graph.nodes):
        found = _frozen_linear(graph, node)
        if found is None:
            continue
        x, constant, weight, bias = found
        name = packs.get(constant.target)
        if name is None:
            name = packs[constant.target] = f"{constant.target}_fastlm_panels"
            setattr(module, name, pack_weight(weight))
        with graph.inserting_before(node):
            panels = graph.get_attr(name)
            linear = graph.call_function(torch.ops.fastlm_cpu.skinny_linear.default,
                                         (x, panels, weight.shape[0], bias))
        linear.meta.update(node.meta)
        node.replace_all_uses_with(linear)
        graph.erase_node(node)
        count += 1
    graph.eliminate_dead_code()
    return count


def inductor_pass():
    """An inductor post-grad pass (``post_grad_custom_post_pass``) running
    :func:`route_frozen_linears`: a frozen CPU decode step's linears over fastlm's kernel."""
    from torch._inductor.custom_graph_pass import CustomGraphPass

    class RouteFrozenLinears(CustomGraphPass):
        def __call__(self, graph: torch.fx.Graph) -> None:
            route_frozen_linears(graph)

        def uuid(self) -> None:
            # No cache key: inductor then compiles this graph afresh instead of taking it from
            # its FX graph cache. That cache keys frozen weights by shape only and stores the
            # constants a pass adds by value, so a hit would bring back panels packed from
            # another model's (or older) weights (tests/model/test_compiled_decode.py).
            return None

    return RouteFrozenLinears()
