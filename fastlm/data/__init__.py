"""Data: tokenizers, corpora and token streams (a leaf package: imports nothing else of fastlm)."""

from fastlm.data.corpus import DataError, default_corpus_files, default_corpus_texts, read_texts, split_train_val
from fastlm.data.chat_template import ChatTemplateError
from fastlm.data.dataset import tokenize_stream
from fastlm.data.tokenizer import ByteTokenizer, HFTokenizer, Tokenizer, load_tokenizer

__all__ = [
    "ByteTokenizer",
    "DataError",
    "ChatTemplateError",
    "HFTokenizer",
    "Tokenizer",
    "default_corpus_files",
    "default_corpus_texts",
    "load_tokenizer",
    "read_texts",
    "split_train_val",
    "tokenize_stream",
]
