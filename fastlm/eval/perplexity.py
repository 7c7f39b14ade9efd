"""Perplexity of a causal LM: of documents with a strided sliding window, or of a token stream.

Strided sliding window (the standard method, as in the transformers perplexity guide). For a
document of n tokens x_0..x_{n-1}, windows start at 0, stride, 2·stride, ...; window k covers
tokens [b_k, e_k) with e_k = min(b_k + window, n) and scores only the tokens no earlier window
scored, i.e. [e_{k-1}, e_k) (and never x_0, which has nothing to condition on). With
1 ≤ stride < window every token x_t (t ≥ 1) is scored exactly once, conditioned on at least
window − stride earlier tokens once the first window is past (stride = window would leave the
first token of each window unscored, so it is refused). The default stride is window // 2 (the
guide's 512 of 1024); stride = window − 1 gives the fastest, nearly disjoint windows.

    NLL = −Σ_docs Σ_{t scored} log p(x_t | window context)      (nats)
    perplexity = exp(NLL / T)             T = number of scored tokens over all documents
    bits_per_byte = NLL / (ln 2 · B)      B = UTF-8 bytes of the texts

With a tokenizer that has a BOS token (and ``add_bos`` left at None) each document is
prefixed with BOS so its first real token is scored too. Windows of all documents are batched
together (longest first, right-padded: causal attention never lets a real token see the padding).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from fastlm import ops
from fastlm.eval.scoring import encode


def _forward_logprobs(model, batch: torch.Tensor) -> torch.Tensor:
    """batch (B, T) int64 -> log-probabilities (B, T, V) in float32."""
    return torch.log_softmax(model(batch).float(), dim=-1)


@torch.no_grad()
def evaluate_loss(
    model,
    tokens: torch.Tensor,
    *,
    seq_len: int,
    batch_size: int = 8,
    max_batches: int | None = None,
) -> float:
    """Mean next-token cross-entropy over non-overlapping windows of ``tokens`` (1-D int64).

    Windows of seq_len + 1 tokens are taken from the start; every token after the first of
    each window is predicted once. ``max_batches`` bounds the work (None: the whole stream).
    """
    if tokens.dim() != 1:
        raise ValueError(f"evaluate_loss: expected a 1-D token stream, got shape {tuple(tokens.shape)}")
    num_windows = (tokens.numel() - 1) // seq_len
    if num_windows < 1:
        raise ValueError(f"evaluate_loss: need at least seq_len + 1 = {seq_len + 1} tokens, got {tokens.numel()}")
    if max_batches is not None:
        num_windows = min(num_windows, max_batches * batch_size)
    was_training = model.training
    model.eval()
    total = torch.zeros((), dtype=torch.float64, device=model.device)
    count = 0
    for start in range(0, num_windows, batch_size):
        rows = torch.arange(start, min(start + batch_size, num_windows))
        index = rows[:, None] * seq_len + torch.arange(seq_len + 1)
        window = tokens[index].to(model.device)
        logits = model(window[:, :-1])
        loss = ops.cross_entropy(logits.flatten(0, 1), window[:, 1:].flatten())
        n = window[:, 1:].numel()
        total += loss.double() * n  # accumulated on the device: one host read at the end
        count += n
    model.train(was_training)
    return float(total) / count


def _documents(texts, tokenizer, add_bos: bool | None) -> tuple[list[list[int]], int | None]:
    """Token ids per document, and the total UTF-8 bytes (None for token-id input)."""
    if isinstance(texts, (str, torch.Tensor)) and not (isinstance(texts, torch.Tensor) and texts.dim() == 2):
        texts = [texts]
    docs: list[list[int]] = []
    total_bytes: int | None = 0
    for i, item in enumerate(texts):
        if isinstance(item, str):
            if tokenizer is None:
                raise ValueError("perplexity: texts are strings, so tokenizer= is required "
                                 "(or pass token ids)")
            bos = getattr(tokenizer, "bos_token_id", None)
            use_bos = (bos is not None) if add_bos is None else add_bos
            if use_bos and bos is None:
                raise ValueError("perplexity: add_bos=True but the tokenizer has no BOS token")
            docs.append(([bos] if use_bos else []) + encode(tokenizer, item))
            if total_bytes is not None:
                total_bytes += len(item.encode("utf-8"))
        elif isinstance(item, torch.Tensor) and item.dim() == 1 or isinstance(item, (list, tuple)):
            ids = item.tolist() if isinstance(item, torch.Tensor) else list(item)
            if not all(isinstance(t, int) and not isinstance(t, bool) for t in ids):
                raise TypeError(f"perplexity: texts[{i}] must hold integer token ids")
            docs.append(ids)
            total_bytes = None
        else:
            raise TypeError(f"perplexity: texts[{i}] must be a str, a list of token ids or a 1-D tensor, "
                            f"got {type(item).__name__}")
    return docs, total_bytes


def sliding_windows(ids: Sequence[int], window: int, stride: int) -> list[tuple[list[int], int]]:
    """The windows of one document: (window tokens, number of trailing tokens it scores).

    A window of L tokens with s scored tokens: inputs are its first L − 1 tokens, targets its
    last L − 1, of which the last s count (s ≤ L − 1, which stride < window guarantees)."""
    if not 1 <= stride < window:
        raise ValueError(f"sliding_windows: need 1 <= stride < window, got stride={stride}, window={window}")
    out = []
    n, prev_end = len(ids), 0
    for begin in range(0, n, stride):
        end = min(begin + window, n)
        scored = end - prev_end if begin else end - 1
        if scored > 0:
            out.append((list(ids[begin:end]), scored))
        prev_end = end
        if end == n:
            break
    return out


@torch.no_grad()
def _strided(model, docs: list[list[int]], window: int, stride: int, batch_size: int,
             progress: bool | None) -> tuple[float, int]:
    from tqdm.auto import tqdm

    items = [w for ids in docs for w in sliding_windows(ids, window, stride)]
    items.sort(key=lambda w: -len(w[0]))
    device = model.device
    total = torch.zeros((), dtype=torch.float64, device=device)
    count = 0
    disable = None if progress is None else not progress  # None: a bar only on a terminal
    for start in tqdm(range(0, len(items), batch_size), desc="perplexity", disable=disable):
        chunk = items[start:start + batch_size]
        width = len(chunk[0][0])
        batch = torch.zeros(len(chunk), width, dtype=torch.int64)
        mask = torch.zeros(len(chunk), width - 1, dtype=torch.bool)
        for row, (ids, scored) in enumerate(chunk):
            batch[row, :len(ids)] = torch.tensor(ids)
            mask[row, len(ids) - 1 - scored:len(ids) - 1] = True
            count += scored
        batch, mask = batch.to(device), mask.to(device)
        logprobs = _forward_logprobs(model, batch[:, :-1])  # (B, W-1, V)
        picked = logprobs.gather(-1, batch[:, 1:, None]).squeeze(-1)  # (B, W-1)
        total -= (picked.double() * mask).sum()
    return float(total), count


def perplexity(
    model,
    texts,
    *,
    window: int | None = None,
    stride: int | None = None,
    tokenizer=None,
    add_bos: bool | None = None,
    batch_size: int = 8,
    progress: bool | None = None,
    seq_len: int | None = None,
    max_batches: int | None = None,
):
    """Perplexity of ``texts`` under ``model`` with a strided sliding window (module docstring).

    texts: a string or a list of strings (then ``tokenizer`` — a fastlm Tokenizer — encodes
    them), or a list of token-id lists / 1-D tensors (then bits_per_byte is None).
    window: tokens per forward pass (default: the model's context, max_position_embeddings);
    stride: tokens between window starts, 1 ≤ stride < window (default: window // 2).
    add_bos: prefix each text with BOS (default: when the tokenizer has one).
    progress: tqdm bar (None: only on a terminal).

    Returns {"perplexity", "nll" (mean per scored token, nats), "tokens" (scored tokens),
    "bits_per_byte", "total_nll" (nats), "bytes"}.

    Legacy form, kept for fastlm.quant's report: ``perplexity(model, stream, seq_len=N,
    batch_size=B, max_batches=M)`` with a 1-D token tensor returns the float
    exp(:func:`evaluate_loss`) over disjoint windows of N + 1 tokens.
    """
    if seq_len is not None:
        if not (isinstance(texts, torch.Tensor) and texts.dim() == 1):
            raise TypeError("perplexity: seq_len= is the legacy token-stream form and needs a 1-D token tensor; "
                            "for texts use window=/stride=")
        if window is not None or stride is not None or tokenizer is not None:
            raise TypeError("perplexity: seq_len= (token-stream form) does not take window, stride or tokenizer")
        return math.exp(evaluate_loss(model, texts, seq_len=seq_len, batch_size=batch_size, max_batches=max_batches))
    if max_batches is not None:
        raise TypeError("perplexity: max_batches= belongs to the seq_len= token-stream form")
    context = model.config.max_position_embeddings
    window = context if window is None else window
    if isinstance(window, bool) or not isinstance(window, int) or not 2 <= window <= context:
        raise ValueError(f"perplexity: window must be an integer in [2, {context}] (the model's context), "
                         f"got {window!r}")
    stride = window // 2 if stride is None else stride
    if isinstance(stride, bool) or not isinstance(stride, int) or not 1 <= stride < window:
        raise ValueError(f"perplexity: stride must be an integer in [1, window={window}) (so every token is "
                         f"scored), got {stride!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"perplexity: batch_size must be a positive integer, got {batch_size!r}")
    docs, total_bytes = _documents(texts, tokenizer, add_bos)
    was_training = model.training
    model.eval()
    try:
        total_nll, count = _strided(model, docs, window, stride, batch_size, progress)
    finally:
        model.train(was_training)
    if count == 0:
        raise ValueError("perplexity: no token to score (every document has fewer than 2 tokens)")
    return {
        "perplexity": math.exp(total_nll / count),
        "nll": total_nll / count,
        "tokens": count,
        "bits_per_byte": total_nll / (math.log(2) * total_bytes) if total_bytes else None,
        "total_nll": total_nll,
        "bytes": total_bytes,
    }
