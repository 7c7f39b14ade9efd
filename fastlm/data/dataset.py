"""Turning texts into token streams for causal-LM training."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from fastlm.data.tokenizer import Tokenizer


def tokenize_stream(texts: Sequence[str], tokenizer: Tokenizer) -> torch.Tensor:
    """Concatenate the token ids of each text, each followed by the end-of-sequence token
    (when the tokenizer has one) so that documents stay separated: 1-D int64 tensor. Each text
    is encoded as ``tokenizer(text)`` in transformers (with the BOS a Llama-style tokenizer adds)."""
    if not texts:
        raise ValueError("tokenize_stream: no texts given")
    eos = tokenizer.eos_token_id is not None
    ids = tokenizer.encode_batch(list(texts), add_eos=eos)
    return torch.tensor([i for doc in ids for i in doc], dtype=torch.int64)
