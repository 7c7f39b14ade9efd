"""The one registration mechanism of fastlm ops: :class:`OpSpec`, :func:`define_op`, :func:`run`.

An op family file (``fastlm/ops/<family>.py``) declares each op with an :class:`OpSpec` —
schema, fake (output shapes for torch.compile), differentiable arguments, reference and
reference backward — and calls ``define_op(spec)``. That declares the custom op
``fastlm::<name>(<args>, str backend)`` (and ``fastlm::<name>_backward`` for differentiable ops)
whose implementation is the kernel registered for the backend (:func:`register_kernel`), and
registers the reference as the ``reference`` kernel. Kernel adapters
(``fastlm/ops/triton/<family>.py``, ``fastlm/ops/cuda/<family>.py``) register
``<name>`` and ``<name>_backward`` for their backend with ``@register_kernel``.

A backward kernel is called as ``bwd(grad, *op_args, *forward_outputs_if_kept, needs)`` and
returns one tensor per present differentiable argument (an empty tensor where ``needs`` is
False); the reference backward formula is called as ``formula(grad, *op_args,
*forward_outputs_if_kept)`` and returns one gradient (or None) per differentiable argument.

:func:`run` is how a public function calls its op once the inputs are checked. The backend is
chosen by :func:`fastlm.ops.backend.select` (cached), then:

- ``reference``: the reference function directly (autograd and torch.compile see plain PyTorch),
  or the spec's ``reference_eager`` where one computes the same faster;
- a kernel backend under torch.compile: the custom op ``torch.ops.fastlm.<name>`` (fake,
  autograd registration: what the compiler needs to see);
- a kernel backend in eager mode: the kernel itself when no gradient is needed, else one
  ``torch.autograd.Function`` whose backward calls the ``<name>_backward`` kernel — the same
  kernels and the same backward contract as the custom op, without its per-call cost.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from fastlm.ops.backend import _KERNELS, kernel_for, register_kernel, select

__all__ = ["OpSpec", "define_op", "defined_ops", "run", "spec_of"]


@dataclass(frozen=True)
class OpSpec:
    """How ``fastlm::<name>`` is declared.

    ``args``: the schema of the op's arguments (without the trailing backend argument);
    ``returns``: the schema of its outputs; ``fake(*args)``: empty outputs of the right shapes
    and dtypes. ``differentiable``: positions of the tensor arguments that take gradients.
    With ``auxiliary_outputs``, the first output is the op's result and the others (e.g.
    attention's logsumexp) are kept for backward, take no gradient and are dropped by
    :func:`run`. With ``outputs_to_backward`` (schema of the outputs, e.g. ``"Tensor out, Tensor
    lse"``) the backward receives the forward outputs after the op's arguments.
    ``mutates``: names of arguments written in place (their schema type is ``Tensor(a!)``).
    ``reference_fn`` / ``reference_backward_fn``: the plain-PyTorch forward and backward formula
    (required for a new op; the defaults, ``fastlm.ops.reference.<name>`` and
    ``fastlm.ops.reference_backward.<name>_backward``, are kept for ops declared outside this package).
    """

    name: str
    args: str
    returns: str
    fake: Callable
    differentiable: tuple[int, ...] = ()
    outputs_to_backward: str = ""
    auxiliary_outputs: bool = False
    reference_fn: Callable | None = None
    reference_backward_fn: Callable | None = None
    mutates: tuple[str, ...] = ()
    # What run() calls on the reference backend, when faster than reference_fn for the same
    # result (e.g. attention through PyTorch's fused SDPA): returns the op's main output only.
    # The custom op's reference kernel and the test oracle stay reference_fn.
    reference_eager: Callable | None = None

    @property
    def num_args(self) -> int:
        return len(self.args.split(","))

    @property
    def reference(self) -> Callable:
        if self.reference_fn is not None:
            return self.reference_fn
        from fastlm.ops import reference

        return getattr(reference, self.name)

    @property
    def reference_backward(self) -> Callable:
        if self.reference_backward_fn is not None:
            return self.reference_backward_fn
        from fastlm.ops import reference_backward

        return getattr(reference_backward, f"{self.name}_backward")


class _Op:
    """What :func:`run` needs of a defined op, resolved once at definition."""

    __slots__ = ("spec", "name", "reference", "reference_aux", "custom_op", "differentiable", "auxiliary",
                 "backward_name")

    def __init__(self, spec: OpSpec, reference: Callable, custom_op) -> None:
        self.spec, self.name, self.custom_op = spec, spec.name, custom_op
        self.reference = spec.reference_eager or reference
        self.reference_aux = spec.auxiliary_outputs and spec.reference_eager is None
        self.differentiable = spec.differentiable
        self.auxiliary = spec.auxiliary_outputs
        self.backward_name = f"{spec.name}_backward"


_DEFINED: dict[str, _Op] = {}
_SAVED = object()  # marks a tensor input kept with ctx.save_for_backward


def defined_ops() -> dict[str, OpSpec]:
    """Every op declared with :func:`define_op`, by name (what tests/ops/test_every_op.py walks)."""
    return {name: op.spec for name, op in _DEFINED.items()}


def spec_of(name: str) -> OpSpec:
    return _DEFINED[name].spec


def _needs_grad(op: _Op, args: tuple) -> bool:
    if not op.differentiable or not torch.is_grad_enabled():
        return False
    for i in op.differentiable:
        a = args[i]
        if a is not None and a.requires_grad:
            return True
    return False


def run(op: str, device: torch.device, *args):
    """Run ``op`` on checked arguments, on the backend selected for ``device`` (module
    docstring). Auxiliary outputs (attention's logsumexp) are dropped."""
    entry = _DEFINED[op]
    backend = select(op, device)
    if backend == "reference":
        out = entry.reference(*args)
        return out[0] if entry.reference_aux else out
    if torch.compiler.is_compiling():
        out = entry.custom_op(*args, backend)
    elif _needs_grad(entry, args):
        out = _KernelFunction.apply(entry, backend, *args)
    else:
        out = kernel_for(op, backend)(*args)
    return out[0] if entry.auxiliary else out


def _grad_list(spec: OpSpec, args: Sequence, needs: Sequence[bool], grads: dict) -> list[torch.Tensor]:
    """One entry per present differentiable argument; an empty tensor where none is needed."""
    out = []
    for i, need in zip(spec.differentiable, needs):
        if args[i] is None:
            continue
        out.append(grads[i] if need else args[i].new_empty((0,)))
    return out


def _reference_backward_kernel(spec: OpSpec) -> Callable:
    """The reference backward kernel: the op's formula called as formula(grad, *op_args,
    *forward_outputs_if_any), its gradients put in the backward kernel's list form."""
    formula = spec.reference_backward
    num_args = spec.num_args

    def backward(grad: torch.Tensor, *args_outputs_needs) -> list[torch.Tensor]:
        *args_outputs, needs = args_outputs_needs
        grads = dict(zip(spec.differentiable, formula(grad, *args_outputs)))
        return _grad_list(spec, args_outputs[:num_args], needs, grads)

    return backward


def _save(ctx, spec: OpSpec, inputs: Sequence, output) -> None:
    """Keep the tensor inputs (and the forward outputs when the backward takes them)."""
    saved_outputs = tuple(output) if spec.outputs_to_backward else ()
    if spec.auxiliary_outputs:
        ctx.mark_non_differentiable(*output[1:])
        # no zero-filled grads for the auxiliary outputs (the fused losses' saved (V, H) dW); the
        # backward then sees None for an undefined grad of the main output too, and returns Nones
        ctx.set_materialize_grads(False)
    ctx.num_saved_outputs = len(saved_outputs)
    ctx.save_for_backward(*(t for t in inputs if isinstance(t, torch.Tensor)), *saved_outputs)
    ctx.inputs = tuple(_SAVED if isinstance(t, torch.Tensor) else t for t in inputs)


def _saved(ctx) -> tuple[list, list]:
    saved = list(ctx.saved_tensors)
    split = len(saved) - ctx.num_saved_outputs
    tensors = iter(saved[:split])
    return [next(tensors) if slot is _SAVED else slot for slot in ctx.inputs], saved[split:]


def _gradients(spec: OpSpec, op_args: Sequence, needs: Sequence[bool], grads) -> list[torch.Tensor | None]:
    """The backward kernel's list spread over the op's arguments (None where not needed)."""
    grads = iter(grads)
    result: list[torch.Tensor | None] = [None] * len(op_args)
    for i, need in zip(spec.differentiable, needs):
        if op_args[i] is None:
            continue
        g = next(grads)
        result[i] = g if need else None
    return result


class _KernelFunction(torch.autograd.Function):
    """Eager autograd of a kernel backend: the forward and backward kernels, called directly."""

    @staticmethod
    def forward(ctx, entry: _Op, backend: str, *args):
        out = kernel_for(entry.name, backend)(*args)
        ctx.entry, ctx.backend = entry, backend
        _save(ctx, entry.spec, args, out)
        return out

    @staticmethod
    def backward(ctx, grad, *aux_grads):
        entry = ctx.entry
        op_args, saved_outputs = _saved(ctx)
        if grad is None:  # the main output's grad is undefined (grads are not materialized): all zero
            return (None,) * (len(op_args) + 2)
        needs = [bool(ctx.needs_input_grad[i + 2]) and op_args[i] is not None for i in entry.differentiable]
        grads = kernel_for(entry.backward_name, ctx.backend)(grad, *op_args, *saved_outputs, needs)
        return (None, None, *_gradients(entry.spec, op_args, needs, grads))


def define_op(spec: OpSpec) -> None:
    """Declare ``fastlm::<spec.name>`` (and its backward op when differentiable), register the
    reference kernels, and make the op available to :func:`run`."""
    if spec.name in _DEFINED:
        raise ValueError(f"fastlm op '{spec.name}' is already defined")
    qualname = f"fastlm::{spec.name}"
    schema = f"({spec.args}, str backend) -> {spec.returns}"

    def impl(*args):
        *op_args, backend = args
        return kernel_for(spec.name, backend)(*op_args)

    op = torch.library.custom_op(qualname, impl, mutates_args=spec.mutates, schema=schema)
    op.register_fake(lambda *args: spec.fake(*args[:-1]))
    reference = spec.reference
    register_kernel(spec.name, "reference")(reference)
    _DEFINED[spec.name] = _Op(spec, reference, getattr(torch.ops.fastlm, spec.name))
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
    register_kernel(bwd_name, "reference")(_reference_backward_kernel(spec))

    def setup_context(ctx, inputs, output):
        _save(ctx, spec, inputs, output)

    def backward(ctx, grad, *aux_grads):  # auxiliary outputs take no gradient
        inputs, saved_outputs = _saved(ctx)
        *op_args, backend = inputs
        if grad is None:  # the main output's grad is undefined (grads are not materialized): all zero
            return (None,) * len(inputs)
        needs = [bool(ctx.needs_input_grad[i]) and op_args[i] is not None for i in spec.differentiable]
        grads = bwd_op(grad, *op_args, *saved_outputs, needs, backend)
        return (*_gradients(spec, op_args, needs, grads), None)

    op.register_autograd(backward, setup_context=setup_context)


def registered_kernels() -> dict[tuple[str, str], Callable]:
    """(op, backend) -> kernel, for every registered kernel (a copy)."""
    return dict(_KERNELS)
