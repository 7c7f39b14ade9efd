"""Input checks shared by the public ops: each raises with the op's name and what was expected."""

from __future__ import annotations

import torch


def check_ndim(op: str, **tensors: tuple[torch.Tensor, int]) -> None:
    """check_ndim("attention", q=(q, 4)) — each tensor must have the given number of dims."""
    for name, (t, ndim) in tensors.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{op}: expected {name} to be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != ndim:
            raise ValueError(f"{op}: expected {name} with {ndim} dims, got shape {tuple(t.shape)}")


def check_floating(op: str, **tensors: torch.Tensor) -> None:
    for name, t in tensors.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{op}: expected {name} to be a torch.Tensor, got {type(t).__name__}")
        if not t.dtype.is_floating_point:
            raise TypeError(f"{op}: expected a floating-point {name} (float32/float16/bfloat16), got {t.dtype}")


def check_dtype(op: str, t: torch.Tensor, dtype: torch.dtype, name: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{op}: expected {name} to be a torch.Tensor, got {type(t).__name__}")
    if t.dtype != dtype:
        raise TypeError(f"{op}: expected {name} of dtype {dtype}, got {t.dtype}")


def check_same_dtype(op: str, **tensors: torch.Tensor) -> None:
    values = iter(tensors.values())
    dtype = next(values).dtype
    for t in values:
        if t.dtype != dtype:
            listed = ", ".join(f"{name}={t.dtype}" for name, t in tensors.items())
            raise TypeError(f"{op}: expected one dtype for all inputs, got {listed}")


def check_same_device(op: str, **tensors: torch.Tensor) -> None:
    values = iter(tensors.values())
    device = next(values).device
    for t in values:
        if t.device != device:
            listed = ", ".join(f"{name} on {t.device}" for name, t in tensors.items())
            raise ValueError(f"{op}: expected all inputs on one device, got {listed}")


def check_last_dim(op: str, x: torch.Tensor, **params: torch.Tensor) -> None:
    """Each parameter must be 1-D with x's last dimension."""
    d = x.shape[-1] if x.dim() else None
    for name, p in params.items():
        if x.dim() == 0 or p.shape != (d,):
            raise ValueError(f"{op}: expected {name} of shape ({d},) matching x (..., {d}), got {tuple(p.shape)}")


def check_window_softcap(op: str, window, softcap, causal: bool = True) -> tuple[int | None, float | None]:
    """Validate attention's sliding ``window`` (an int >= 1, or None; needs causal) and logit
    ``softcap`` (a finite float > 0, or None); returns them as (int | None, float | None)."""
    if window is not None:
        if isinstance(window, bool) or not isinstance(window, int) or window < 1:
            raise ValueError(f"{op}: window must be an integer >= 1 (the number of most recent keys each query "
                             f"sees) or None, got {window!r}")
        if not causal:
            raise ValueError(f"{op}: window={window} (sliding-window attention) requires causal=True")
        window = int(window)
    if softcap is not None:
        if isinstance(softcap, bool) or not isinstance(softcap, (int, float)) or not 0 < softcap < float("inf"):
            raise ValueError(f"{op}: softcap must be a finite number > 0 (scores become softcap·tanh(s / softcap)) "
                             f"or None, got {softcap!r}")
        softcap = float(softcap)
    return window, softcap


def check_heads(op: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    """q (B, H, Tq, D) against k and v (B, Hkv, Tk, D): equal k/v shapes, batch and head dim,
    H a multiple of Hkv (GQA)."""
    if k.shape != v.shape:
        raise ValueError(f"{op}: k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    if q.shape[0] != k.shape[0]:
        raise ValueError(f"{op}: batch sizes differ: q has {q.shape[0]}, k/v have {k.shape[0]}")
    if q.shape[-1] != k.shape[-1]:
        raise ValueError(f"{op}: head dims differ: q has D={q.shape[-1]}, k/v have D={k.shape[-1]}")
    if k.shape[1] == 0 or q.shape[1] % k.shape[1] != 0:
        raise ValueError(
            f"{op}: the {q.shape[1]} query heads must be a multiple of the {k.shape[1]} key/value heads (GQA)"
        )


def check_lengths(op: str, lens: torch.Tensor, batch: int, device: torch.device) -> None:
    """One int32/int64 length per sequence, on ``device``."""
    if lens.shape != (batch,):
        raise ValueError(f"{op}: expected shape ({batch},) (one length per sequence), got {tuple(lens.shape)}")
    if lens.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"{op}: expected int32 or int64 lengths, got {lens.dtype}")
    if lens.device != device:
        raise ValueError(f"{op}: expected lengths on {device}, got {lens.device}")


def attention_inputs_ok(q, k, v) -> bool:
    """Whether q, k, v pass :func:`check_attention_inputs`, in one pass of plain comparisons."""
    if not (isinstance(q, torch.Tensor) and isinstance(k, torch.Tensor) and isinstance(v, torch.Tensor)):
        return False
    qs, ks, dtype, device = q.shape, k.shape, q.dtype, q.device
    return (len(qs) == 4 and len(ks) == 4 and ks == v.shape and dtype.is_floating_point and k.dtype == dtype
            and v.dtype == dtype and k.device == device and v.device == device and qs[0] == ks[0]
            and qs[3] == ks[3] and ks[1] != 0 and qs[1] % ks[1] == 0)


def check_attention_inputs(op: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, names=("q", "k", "v")) -> None:
    """q (B, H, Tq, D), k and v (B, Hkv, Tk, D): tensors of 4 dims, one floating dtype, one
    device, :func:`check_heads`. Valid inputs cost one pass of plain comparisons
    (:func:`attention_inputs_ok`, the per-call path); the detailed checks, which name the fault,
    run only when it says no."""
    if attention_inputs_ok(q, k, v):
        return
    qn, kn, vn = names
    check_ndim(op, **{qn: (q, 4), kn: (k, 4), vn: (v, 4)})
    check_floating(op, **{qn: q, kn: k, vn: v})
    check_same_dtype(op, **{qn: q, kn: k, vn: v})
    check_same_device(op, **{qn: q, kn: k, vn: v})
    check_heads(op, q, k, v)
