"""torch.library registration of every fastlm op as ``fastlm::<name>``.

Each op is a custom op whose last argument names the backend; its implementation is the kernel
registered for that backend (see :mod:`fastlm.ops.backend`). A fake implementation gives output
shapes to torch.compile, and differentiable ops get autograd through a companion
``fastlm::<name>_backward`` op that dispatches by backend the same way. The reference backend's
backward is the plain-PyTorch formula in :mod:`fastlm.ops.reference_backward`, so every op
trains through its custom op even before a kernel backward exists; a kernel backend registers its own
``<name>_backward`` kernel.

:func:`run` is how the public ops call them: the custom op for kernel backends, and the
reference function directly for the reference backend (autograd and torch.compile understand
plain PyTorch without the custom op).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from fastlm.ops import reference, reference_backward
from fastlm.ops.backend import kernel_for, register_kernel, select


@dataclass(frozen=True)
class OpSpec:
    """How ``fastlm::<name>`` is declared.

    With ``auxiliary_outputs``, the first output is the op's result and the others (e.g.
    attention's logsumexp) are kept for backward and take no gradient. With ``outputs_to_backward`` (schema of the outputs, e.g.
    ``"Tensor out, Tensor lse"``) the backward op receives the forward outputs after the op's
    arguments, so a kernel backward need not recompute them.
    """

    name: str
    args: str  # schema of the op's arguments, without the trailing backend argument
    returns: str
    fake: Callable
    differentiable: tuple[int, ...] = ()  # positions of the tensor arguments that take gradients
    outputs_to_backward: str = ""
    auxiliary_outputs: bool = False  # outputs after the first are for backward only, not returned by fastlm.ops
    # The reference kernels; default: fastlm.ops.reference.<name> and reference_backward.<name>_backward.
    reference_fn: Callable | None = None
    reference_backward_fn: Callable | None = None

    @property
    def num_args(self) -> int:
        return len(self.args.split(","))


def _promoted(*tensors: torch.Tensor) -> torch.dtype:
    dtype = tensors[0].dtype
    for t in tensors[1:]:
        dtype = torch.promote_types(dtype, t.dtype)
    return dtype


def _linear_fake(x: torch.Tensor, out_features: int) -> torch.Tensor:
    return x.new_empty((*x.shape[:-1], out_features))


SPECS: tuple[OpSpec, ...] = (
    OpSpec(
        "attention",
        "Tensor q, Tensor k, Tensor v, bool causal, float? scale, Tensor? key_lens, int? window, float? softcap",
        "(Tensor, Tensor)",  # out (B, H, Tq, D), logsumexp (B, H, Tq) float32
        lambda q, k, v, causal, scale, key_lens, window, softcap: (
            torch.empty_like(q),
            q.new_empty(q.shape[:3], dtype=torch.promote_types(q.dtype, torch.float32)),
        ),
        differentiable=(0, 1, 2),
        outputs_to_backward="Tensor out, Tensor lse",
        auxiliary_outputs=True,
        reference_fn=reference.attention_forward,
    ),
    OpSpec(
        "decode_attention",
        "Tensor q, Tensor k_cache, Tensor v_cache, Tensor cache_lens, float? scale, int? window, float? softcap",
        "Tensor",
        lambda q, k, v, lens, scale, window, softcap: torch.empty_like(q),
    ),
    OpSpec(
        "rms_norm",
        "Tensor x, Tensor weight, float eps",
        "Tensor",
        lambda x, w, eps: torch.empty_like(x, dtype=_promoted(x, w)),
        differentiable=(0, 1),
    ),
    OpSpec(
        "layer_norm",
        "Tensor x, Tensor weight, Tensor bias, float eps",
        "Tensor",
        lambda x, w, b, eps: torch.empty_like(x),
        differentiable=(0, 1, 2),
    ),
    OpSpec(
        "rope",
        "Tensor x, Tensor positions, float theta",
        "Tensor",
        lambda x, positions, theta: torch.empty_like(x),
        differentiable=(0,),
    ),
    OpSpec(
        "swiglu",
        "Tensor gate, Tensor up",
        "Tensor",
        lambda gate, up: torch.empty_like(gate, dtype=_promoted(gate, up)),
        differentiable=(0, 1),
    ),
    OpSpec("gelu", "Tensor x", "Tensor", lambda x: torch.empty_like(x), differentiable=(0,)),
    OpSpec(
        "lora_linear",
        "Tensor x, Tensor weight, Tensor lora_a, Tensor lora_b, float scale, Tensor? bias",
        "Tensor",
        lambda x, w, a, b, scale, bias: _linear_fake(x, w.shape[0]),
        differentiable=(0, 1, 2, 3, 5),
    ),
    OpSpec(
        "quantize_int8",
        "Tensor weight",
        "(Tensor, Tensor)",
        lambda w: (
            torch.empty_like(w, dtype=torch.int8),
            w.new_empty((w.shape[0],), dtype=torch.float32),
        ),
    ),
    OpSpec(
        "int8_linear",
        "Tensor x, Tensor qweight, Tensor scales, Tensor? bias",
        "Tensor",
        lambda x, q, scales, bias: _linear_fake(x, q.shape[0]),
        differentiable=(0, 3),
    ),
    # "sample" is defined by fastlm/ops/sampling.py (per-row parameters, min-p, status).
    OpSpec(
        "cross_entropy",
        "Tensor logits, Tensor targets, int ignore_index",
        "Tensor",
        lambda logits, targets, ignore_index: logits.new_empty(
            (), dtype=torch.promote_types(logits.dtype, torch.float32)
        ),
        differentiable=(0,),
    ),
)


def _reference_backward(spec: OpSpec) -> Callable:
    """The reference backward kernel: the op's formula in fastlm.ops.reference_backward, called
    as formula(grad, *op_args, *forward_outputs_if_any)."""
    formula = spec.reference_backward_fn or getattr(reference_backward, f"{spec.name}_backward")
    num_args = spec.num_args

    def backward(grad: torch.Tensor, *args_outputs_needs) -> list[torch.Tensor]:
        *args_outputs, needs = args_outputs_needs
        grads = dict(zip(spec.differentiable, formula(grad, *args_outputs)))
        return _grad_list(spec, args_outputs[:num_args], needs, grads)

    return backward


def _grad_list(spec: OpSpec, args: Sequence, needs: Sequence[bool], grads: dict) -> list[torch.Tensor]:
    """One entry per present differentiable argument; an empty tensor where none is needed."""
    out = []
    for i, need in zip(spec.differentiable, needs):
        if args[i] is None:
            continue
        out.append(grads[i] if need else args[i].new_empty((0,)))
    return out


_SAVED = object()  # marks a tensor input kept with ctx.save_for_backward
_DEFINED: dict[str, OpSpec] = {}


def run(op: str, device: torch.device, *args):
    """Run ``op`` on the backend selected for ``device``: the reference function directly
    (autograd and torch.compile see plain PyTorch), or the custom op ``fastlm::<op>`` that
    calls the backend's kernel. Auxiliary outputs (attention's logsumexp) are dropped."""
    spec = _DEFINED[op]
    backend = select(op, device)
    if backend == "reference":
        out = (spec.reference_fn or getattr(reference, op))(*args)
    else:
        out = getattr(torch.ops.fastlm, op)(*args, backend)
    return out[0] if spec.auxiliary_outputs else out


def define_op(spec: OpSpec) -> None:
    """Declare ``fastlm::<spec.name>`` (and its backward op when differentiable) and register
    its reference kernels. Op families outside this file call it for their own specs."""
    _DEFINED[spec.name] = spec
    qualname = f"fastlm::{spec.name}"
    schema = f"({spec.args}, str backend) -> {spec.returns}"

    def impl(*args):
        *op_args, backend = args
        return kernel_for(spec.name, backend)(*op_args)

    op = torch.library.custom_op(qualname, impl, mutates_args=(), schema=schema)
    op.register_fake(lambda *args: spec.fake(*args[:-1]))
    register_kernel(spec.name, "reference")(spec.reference_fn or getattr(reference, spec.name))
    if not spec.differentiable:
        return

    bwd_name = f"{spec.name}_backward"
    outputs = f"{spec.outputs_to_backward}, " if spec.outputs_to_backward else ""
    bwd_schema = f"(Tensor grad, {spec.args}, {outputs}bool[] needs, str backend) -> Tensor[]"
    num_args = spec.num_args

    def bwd_impl(*args):
        *op_args, backend = args
        return kernel_for(bwd_name, backend)(*op_args)

    def bwd_fake(grad, *args):
        op_args, needs = args[:num_args], args[-2]
        grads = {i: torch.empty_like(op_args[i]) for i in spec.differentiable if op_args[i] is not None}
        return _grad_list(spec, op_args, needs, grads)

    bwd_op = torch.library.custom_op(f"fastlm::{bwd_name}", bwd_impl, mutates_args=(), schema=bwd_schema)
    bwd_op.register_fake(bwd_fake)
    register_kernel(bwd_name, "reference")(_reference_backward(spec))

    def setup_context(ctx, inputs, output):
        saved_outputs = tuple(output) if spec.outputs_to_backward else ()
        if spec.auxiliary_outputs:
            ctx.mark_non_differentiable(*output[1:])
        ctx.num_saved_outputs = len(saved_outputs)
        ctx.save_for_backward(*(t for t in inputs if isinstance(t, torch.Tensor)), *saved_outputs)
        ctx.inputs = tuple(_SAVED if isinstance(t, torch.Tensor) else t for t in inputs)

    def backward(ctx, grad, *aux_grads):  # auxiliary outputs take no gradient
        saved = list(ctx.saved_tensors)
        saved_outputs = saved[len(saved) - ctx.num_saved_outputs :]
        saved = iter(saved[: len(saved) - ctx.num_saved_outputs])
        inputs = [next(saved) if slot is _SAVED else slot for slot in ctx.inputs]
        *op_args, backend = inputs
        needs = [bool(ctx.needs_input_grad[i]) and op_args[i] is not None for i in spec.differentiable]
        grads = iter(bwd_op(grad, *op_args, *saved_outputs, needs, backend))
        result: list[torch.Tensor | None] = [None] * len(inputs)
        for i, need in zip(spec.differentiable, needs):
            if op_args[i] is None:
                continue
            g = next(grads)
            result[i] = g if need else None
        return tuple(result)

    op.register_autograd(backward, setup_context=setup_context)


for _spec in SPECS:
    define_op(_spec)
