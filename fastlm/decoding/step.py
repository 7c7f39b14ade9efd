"""The decode step: one new token per sequence through a static KV cache -> next-token logits
(:func:`decode_logits`), or for greedy decoding the next tokens themselves (:func:`decode_greedy`).

:class:`DecodeStep` runs it eagerly, or compiled with ``torch.compile`` (fullgraph): on CUDA
with ``mode="reduce-overhead"``, so the whole step — every layer's kernels — replays as one
CUDA graph over the static cache (gpt-fast's recipe); on CPU as inductor's generated C++ called
from a C++ wrapper, with the weights frozen into the graph (inductor's ``freezing``: the
parameters become constants, folded and laid out once for its GEMMs) and ``max_autotune``
(:data:`CPU_COMPILE_OPTIONS`; measured in bench/bench_decode.py). A float32 step of 2 to
:data:`fastlm.decoding.cpu_gemm.MAX_ROWS` rows runs its linears over fastlm's AVX-512 skinny
GEMM where it runs: an inductor post-grad pass packs each frozen weight into the kernel's
panels (:func:`fastlm.decoding.cpu_gemm.route_frozen_linears`; inductor packs none itself,
:func:`_no_library_packing`); otherwise inductor prepacks the weights for MKL's sgemm at
batch 1, for oneDNN's above (:class:`_OneDnnPacks`), and autotunes each matmul among its C++
GEMM templates and the library call. A frozen step may hold its
own copy of the weights and never sees later changes to them, so each compiled step is keyed
by the weights' identity and version (:func:`weights_version`, read once per ``generate``
call): a weight changed in place (an optimizer step, ``load_state_dict``, a LoRA merge, ...)
or replaced compiles a fresh step (tests/model/test_compiled_decode.py). A change made behind
autograd's back (``param.data.copy_(...)``, which bumps no version) is not seen by that key:
call :func:`release_caches` after one. Models over :data:`CPU_FREEZE_MAX_BYTES` of weights
compile unfrozen (no second copy of their weights; slower steps).
The step reads no host-side state (positions and lengths are device
tensors), so one compiled graph serves every step; the host only counts the filled positions
for its capacity check. The compiled path keeps its caches and compiled steps on the model
between calls (:func:`reusable_cache`); :func:`release_caches` frees them.
"""

from __future__ import annotations

import contextlib
import itertools
import types
import warnings
import weakref
from collections import OrderedDict
from unittest import mock

import torch
from torch.utils.weak import WeakIdKeyDictionary

from fastlm.cache import KVCache
from fastlm.decoding import cpu_gemm
from fastlm.decoding.common import hits_eos
from fastlm.decoding.packed import pack_kind, release_packs
from fastlm.model import BatchLayout, Model
from fastlm.ops.backend import select


def decode_logits(model: Model, cache: KVCache, tokens: torch.Tensor, length: int | None = None) -> torch.Tensor:
    """tokens (B,) int64 at positions cache.lens -> float32 logits (B, vocab); the tokens'
    keys/values are appended and cache.lens advances by one (all on the device). ``length``: a
    host bound on every sequence's length after the step (eager: attention reads no further;
    None: the whole cache, one static shape for compilation). Attention always reads the cache
    (the prompt is in it): the model's cache path with ``BatchLayout.cached`` >= 1 or None."""
    positions = cache.lens[:, None]  # (B, 1)
    if length is None:  # compiled: the ops themselves, traced
        layout = BatchLayout(cached=None)
    else:  # eager: the layers share one per-step state where the ops would run their references
        layout = BatchLayout(cached=length - 1, step=cache.decode_step(length) if _references(cache) else None)
    logits = model.forward_embeddings(model.embed(tokens[:, None]), positions, cache, layout)
    cache.lens.add_(1)  # in place: no module attribute is set (fewer guards when compiled)
    return logits[:, -1].float()


def _references(cache: KVCache) -> bool:
    """Whether the cache write and decode attention run their reference ops on the cache's
    device (then :class:`fastlm.cache.DecodeStepState` computes the same, once per step)."""
    device = cache.k.device
    return select("rope_append_kv", device) == "reference" and select("decode_attention", device) == "reference"


def pick_greedy(scores: torch.Tensor, finished: torch.Tensor, bad: torch.Tensor, eos: torch.Tensor | None,
                pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Greedy choice with per-sequence finishing, all on the device: scores (B, V) -> (tokens
    (B,) — the first argmax, pad_id where already finished —, finished (B,) updated with the
    eos ids ``eos`` (a 1-D tensor or None), bad (B,) flags of NaN/+inf scores, accumulated)."""
    best, index = scores.max(dim=-1)  # (B,): the first maximum, NaN if any score is NaN (as argmax)
    tokens = torch.where(finished, pad_id, index)
    bad = bad | ~(best < float("inf"))  # a NaN or +inf score makes the row's maximum NaN or +inf
    return tokens, finished if eos is None else finished | hits_eos(tokens, eos), bad


def decode_greedy(model: Model, cache: KVCache, tokens: torch.Tensor, finished: torch.Tensor, bad: torch.Tensor,
                  eos: torch.Tensor | None, pad_id: int, length: int | None = None):
    """:func:`decode_logits` then :func:`pick_greedy`: one greedy decode step, as one graph."""
    return pick_greedy(decode_logits(model, cache, tokens, length), finished, bad, eos, pad_id)


MAX_COMPILED = 16  # compiled step variants kept per process; further shapes run eagerly
_COMPILED: OrderedDict[tuple, tuple[int, object]] = OrderedDict()  # bucket -> (weights version, compiled fn)
_FULL_WARNED: list[bool] = [False]
_SERIAL = itertools.count()  # names each compiled copy's code object
#: inductor options of the compiled CPU step: the C++ wrapper (no Python between kernels),
#: frozen weights (see :func:`_frozen_on_first_call`), and max-autotune over inductor's C++ GEMM
#: templates and aten's BLAS for each matmul (bench/bench_decode.py has the figures); the cost is
#: compile time (~20-30 s instead of ~7 s for the tiny preset on the project's CPU).
CPU_COMPILE_OPTIONS = {"cpp_wrapper": True, "freezing": True, "max_autotune": True,
                       "max_autotune_gemm_backends": "CPP,ATEN",
                       # quiet: no autotuning table printed into the user's generate call
                       "autotune_num_choices_displayed": 0, "max_autotune_report_choices_stats": False}
#: models whose weights take more bytes compile their CPU step unfrozen (``{"cpp_wrapper": True}``,
#: weights read in place): a frozen step holds its own laid-out copy of the weights, and with
#: inductor's working buffers the process grew by ~2.5x the weights' bytes on top of an unfrozen
#: compile (27M-parameter model, fp32: +260 MB).
CPU_FREEZE_MAX_BYTES = 2 * 2**30


def weights_version(model: torch.nn.Module) -> int:
    """A key of the current weights: a hash of every parameter's and buffer's (address, version
    counter, optimizer steps taken over it). It changes when a tensor is replaced, modified in
    place through autograd-visible ops (torch.no_grad included), or stepped by a
    ``torch.optim`` optimizer — counted by a post-step hook (:func:`_count_optimizer_steps`,
    registered on the first call), since the fused AdamW/Adam/SGD kernels bump no version
    counter. ``.data`` writes and other version-less kernels are not seen (call
    :func:`release_caches` after one). O(number of tensors) on the host."""
    if not _STEP_HOOK:
        from torch.optim.optimizer import register_optimizer_step_post_hook

        _STEP_HOOK.append(register_optimizer_step_post_hook(_count_optimizer_steps))
    tensors = [*model.parameters(), *model.buffers()]
    return hash(tuple((t.data_ptr(), t._version, _OPTIMIZER_STEPS.get(t, 0)) for t in tensors))


_STEP_HOOK: list = []  # the registered optimizer post-step hook's handle, once registered
_OPTIMIZER_STEPS = WeakIdKeyDictionary()  # parameter -> optimizer steps counted (keyed by identity)


def _count_optimizer_steps(optimizer: torch.optim.Optimizer, args, kwargs) -> None:
    """After any optimizer's step: count one more step over each of its parameters."""
    for group in optimizer.param_groups:
        for param in group["params"]:
            _OPTIMIZER_STEPS[param] = _OPTIMIZER_STEPS.get(param, 0) + 1


def _compiled(fn, device_type: str, shape: tuple, version: int = 0, freeze: bool = False):
    """``fn`` compiled for a device type and one shape bucket ``shape`` (model, batch size, cache
    length) over the weights ``version`` (:func:`weights_version`; a new version replaces the
    bucket's step, which froze the old weights on CPU): CUDA graphs on CUDA; on CPU a C++
    wrapper calls the generated kernels (:data:`CPU_COMPILE_OPTIONS`). None once MAX_COMPILED
    variants exist. ``freeze`` (CPU): frozen weights and :data:`CPU_COMPILE_OPTIONS`, else only
    the C++ wrapper.

    Each compilation compiles its own copy of ``fn``'s code object: dynamo counts recompilations
    per code object (8 by default, then FailOnRecompileLimitHit under fullgraph), so one shared
    code object would fail at the 9th (batch, length) bucket of a process — a server or a sweep;
    and dynamo's guards do not look at weight values, so a step of old frozen weights must never
    be found again through a shared code object."""
    key = (fn.__name__, device_type, shape, freeze)
    if key in _COMPILED:
        if _COMPILED[key][0] == version:
            return _COMPILED[key][1]
        del _COMPILED[key]  # the weights changed since it was compiled: drop it
    if len(_COMPILED) >= MAX_COMPILED:
        return None
    code = fn.__code__.replace(co_name=f"{fn.__name__}_{next(_SERIAL)}")  # a distinct code object
    fresh = types.FunctionType(code, fn.__globals__, fn.__name__, fn.__defaults__, fn.__closure__)
    if device_type == "cuda":
        compiled = torch.compile(fresh, fullgraph=True, dynamic=False, mode="reduce-overhead")
    elif freeze and _skinny(shape):
        options = dict(_known_options(CPU_COMPILE_OPTIONS), post_grad_custom_post_pass=cpu_gemm.inductor_pass())
        compiled = _frozen_on_first_call(torch.compile(fresh, fullgraph=True, dynamic=False, options=options),
                                         skinny=True)
    elif freeze:
        compiled = _frozen_on_first_call(
            torch.compile(fresh, fullgraph=True, dynamic=False, options=_known_options(CPU_COMPILE_OPTIONS)),
            onednn=pack_kind(shape[1]) == "onednn")
    else:
        compiled = torch.compile(fresh, fullgraph=True, dynamic=False, options={"cpp_wrapper": True})
    _COMPILED[key] = (version, compiled)
    return compiled


def _skinny(shape: tuple) -> bool:
    """Whether a frozen CPU step of ``shape`` runs its linears over fastlm's skinny GEMM
    (:mod:`fastlm.decoding.cpu_gemm`): float32, a batch of 2 to its MAX_ROWS rows, and the
    kernel runs here. A batch of one keeps inductor's MKL-packed GEMMs and their fused
    epilogues, faster end to end there (bench/results/cpu/bench_decode.md)."""
    return (shape[3] == str(torch.float32) and 2 <= shape[1] <= cpu_gemm.MAX_ROWS
            and cpu_gemm.available())


def _known_options(options: dict) -> dict:
    """The inductor options this torch knows (torch.compile rejects an unknown one; the
    reporting switches are newer than some supported torch versions)."""
    import torch._inductor.config as inductor_config

    return {name: value for name, value in options.items() if hasattr(inductor_config, name)}


class _OneDnnPacks:
    """``torch.ops.mkldnn`` as inductor's weight-prepack pass sees it while a frozen step of a
    batch of several rows compiles: the pass packs a float32 weight for MKL's sgemm unless oneDNN
    is the platform's GEMM library (aarch64's ACL), and for a few rows oneDNN's packed GEMM reads
    the weights about twice as fast on this project's CPU (:mod:`fastlm.decoding.packed` has the
    figures). Every other name is ``torch.ops.mkldnn``'s."""

    def __getattr__(self, name):
        return getattr(torch.ops.mkldnn, name)

    @staticmethod
    def _is_mkldnn_acl_supported() -> bool:
        return True


def _onednn_packing():
    """A context in which inductor packs float32 linear weights for oneDNN (:class:`_OneDnnPacks`);
    a no-op where this torch's pass is laid out otherwise."""
    from torch._inductor.fx_passes import mkldnn_fusion

    if getattr(mkldnn_fusion, "mkldnn", None) is not torch.ops.mkldnn:
        return contextlib.nullcontext()
    return mock.patch.object(mkldnn_fusion, "mkldnn", _OneDnnPacks())


class _NoLibraryPacks(_OneDnnPacks):
    """``torch.ops.mkldnn`` as inductor's weight-prepack pass sees it while a frozen step for
    fastlm's skinny GEMM compiles: with neither oneDNN as the GEMM library nor MKL
    (:func:`_no_library_packing`), it packs no float32 linear weight, so the step's linears
    reach the post-grad pass (:func:`fastlm.decoding.cpu_gemm.route_frozen_linears`) as plain
    matmuls over the frozen weights."""

    @staticmethod
    def _is_mkldnn_acl_supported() -> bool:
        return False


def _no_library_packing():
    """A context in which inductor's prepack pass packs no float32 linear weight (the pass asks
    ``mkldnn._is_mkldnn_acl_supported()`` and ``torch._C.has_mkl`` each time it looks at a
    linear; its patterns are registered once per process, so switching the pass off through
    ``cpp.weight_prepack`` would leave a process whose first frozen compile was ours without
    them); a no-op where this torch's pass is laid out otherwise."""
    from torch._inductor.fx_passes import mkldnn_fusion

    if getattr(mkldnn_fusion, "mkldnn", None) is not torch.ops.mkldnn:
        return contextlib.nullcontext()
    stack = contextlib.ExitStack()
    stack.enter_context(mock.patch.object(mkldnn_fusion, "mkldnn", _NoLibraryPacks()))
    stack.enter_context(mock.patch.object(torch._C, "has_mkl", False))
    return stack


def _frozen_on_first_call(compiled, onednn: bool = False, skinny: bool = False):
    """``compiled`` whose first call (the one that traces and compiles) runs with inductor's
    global ``freezing`` flag set: dynamo reads that flag itself while tracing (to lift the
    parameters as constants of the graph), so the per-compile ``options`` alone freeze nothing.
    ``onednn``: the frozen linear weights are packed for oneDNN's GEMM (:func:`_onednn_packing`);
    ``skinny``: packed by no library (:func:`_no_library_packing`; the post-grad pass packs
    them for fastlm's GEMM)."""
    traced = []

    def call(*args):
        if traced:
            return compiled(*args)
        packing = _onednn_packing() if onednn else _no_library_packing() if skinny else contextlib.nullcontext()
        with torch._inductor.config.patch(freezing=True), packing, warnings.catch_warnings():
            # inductor's autotuner touches a deprecated storage API: torch's own notice, not the user's
            warnings.filterwarnings("ignore", message="TypedStorage is deprecated", category=UserWarning)
            out = compiled(*args)
        traced.append(True)
        return out

    return call


def _warn_eager(why: str) -> None:
    if not _FULL_WARNED[0]:
        _FULL_WARNED[0] = True
        warnings.warn(f"generate(compile=True): {why}; further new shapes decode eagerly (same tokens, "
                      "slower steps). Reuse batch sizes, or raise fastlm.decoding.step.MAX_COMPILED.",
                      RuntimeWarning, stacklevel=4)


class DecodeStep:
    """``step(tokens)`` -> logits: one decode step of ``model`` over ``cache``, which must
    already hold each sequence's prompt (after the prefill); ``step.greedy(...)`` also picks
    the next tokens (:func:`decode_greedy`). ``compile=True`` runs them through torch.compile
    (see the module docstring); the first call compiles (seconds on CUDA, tens of seconds on
    CPU), later calls with the same model and cache shapes reuse the graph."""

    def __init__(self, model: Model, cache: KVCache, *, compile: bool = False) -> None:
        if not isinstance(cache, KVCache):
            raise TypeError(f"DecodeStep: needs a static KVCache, got {type(cache).__name__}")
        self.model, self.cache = model, cache
        self.device_type = cache.k.device.type
        self.compiled = compile
        self.ran_compiled = False
        # frozen (CPU) steps are only valid for the weights they froze: read their version once per call
        tensors = [*model.parameters(), *model.buffers()]
        self.freeze = (compile and self.device_type != "cuda"
                       and sum(t.numel() * t.element_size() for t in tensors) <= CPU_FREEZE_MAX_BYTES)
        self.weights_version = weights_version(model) if self.freeze else 0

    def _run(self, fn, *args):
        if self.cache.filled == 0:
            raise RuntimeError("DecodeStep: the cache is empty; run the prompt through the model (prefill) first")
        if self.cache.filled + 1 > self.cache.max_len:
            raise ValueError(f"DecodeStep: the cache is full ({self.cache.max_len} positions)")
        compiled = None
        if self.compiled:  # static shapes: one graph for every step of this bucket
            shape = (id(self.model), self.cache.batch_size, self.cache.max_len, str(self.cache.k.dtype))
            compiled = _compiled(fn, self.device_type, shape, self.weights_version, self.freeze)
            if compiled is None:
                _warn_eager(f"{MAX_COMPILED} compiled decode steps exist in this process")
        self.ran_compiled = compiled is not None
        if compiled is not None:
            from torch._dynamo.exc import FailOnRecompileLimitHit  # (torch._dynamo is loaded by now)

            if self.device_type == "cuda":
                torch.compiler.cudagraph_mark_step_begin()  # the previous step's outputs are consumed
            try:
                out = compiled(self.model, self.cache, *args)
            except FailOnRecompileLimitHit as err:  # e.g. a model's attributes changed between calls
                _warn_eager(f"torch.compile hit its recompile limit ({err})")
                _COMPILED[next(k for k, v in _COMPILED.items() if v[1] is compiled)] = (self.weights_version, None)
                self.ran_compiled = False
                out = fn(self.model, self.cache, *args, self.cache.filled + 1)
        else:
            out = fn(self.model, self.cache, *args, self.cache.filled + 1)
        self.cache.filled += 1
        return out

    def __call__(self, tokens: torch.Tensor) -> torch.Tensor:
        return self._run(decode_logits, tokens)

    def greedy(self, tokens: torch.Tensor, finished: torch.Tensor, bad: torch.Tensor, eos: torch.Tensor | None,
               pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Feed ``tokens`` and pick the next ones greedily: see :func:`pick_greedy`."""
        out = self._run(decode_greedy, tokens, finished, bad, eos, pad_id)
        if self.ran_compiled and self.device_type == "cuda":  # the graph's outputs are overwritten by its next replay
            out = tuple(t.clone() for t in out)
        return out


_STATIC_CACHES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def reusable_cache(model: Model, batch_size: int, max_len: int, min_len: int = 64) -> KVCache:
    """An empty static cache for ``model``, kept between calls (one per batch size and length
    bucket): a compiled/graph-captured step stays valid only over the same cache buffers.
    max_len is rounded up to a power of two (at least ``min_len``, capped by the model's
    context): a few graphs cover every length, and attention reads at most twice the need."""
    max_len = min(max(1 << (max_len - 1).bit_length(), min_len), model.config.context_length)
    caches = _STATIC_CACHES.setdefault(model, {})
    key = (batch_size, max_len, model.dtype, model.device)
    cache = caches.get(key)
    if cache is None:
        cache = caches[key] = model.new_cache(batch_size, max_len)
        if cache.k.is_cuda:  # fixed addresses: CUDA graphs may mutate them in place (as transformers' StaticCache)
            for buffer in (cache.k, cache.v, cache.lens):
                torch._dynamo.mark_static_address(buffer)
    cache.reset()
    return cache


def release_caches(model: Model) -> None:
    """Free the static caches :func:`reusable_cache` keeps for ``model``, its compiled decode
    steps and its prepacked weights (:mod:`fastlm.decoding.packed`); the next ``compile=True``
    call compiles again."""
    release_packs(model)
    _STATIC_CACHES.pop(model, None)
    for key in [k for k in _COMPILED if k[2][0] == id(model)]:
        del _COMPILED[key]
