"""Tests for fastlm.data.tokenizer: round trips, save/load, Hugging Face interop, bad input."""

import json
import os

import pytest
import tokenizers
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fastlm.data.corpus import default_corpus_texts
from fastlm.data.tokenizer import (
    FASTLM_TOKENIZER_FILE,
    ByteTokenizer,
    HFTokenizer,
    Tokenizer,
    load_tokenizer,
)

# Text that stresses byte-level round trips: whitespace runs, leading spaces, CRLF, NUL, scripts.
EDGE_CASES = [
    "",
    " ",
    "   leading spaces",
    "trailing spaces   ",
    "a\r\nb\r\n",
    "\t\ttabs\tand  double  spaces\n\n\n",
    "\x00nul\x00",
    "héllo wörld",
    "漢字かなカナ한국어",
    "emoji 😀👩‍👩‍👧 flags 🇫🇷",
    "\u200bzero\u200dwidth\ufeff",
    "<|bos|> literal <|eos|><|pad|>",
    "def f(x):\n    return x  # comment\n",
]

# Arbitrary unicode (no lone surrogates: those are not text), mixed with runs of whitespace.
texts_strategy = st.lists(
    st.one_of(st.text(max_size=20), st.sampled_from([" ", "  ", "\n", "\r\n", "\t", "    ", "\n\n"])),
    max_size=12,
).map("".join)

HYPOTHESIS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@pytest.fixture(scope="module")
def bpe() -> HFTokenizer:
    extra = ["Grüße aus Köln. 東京は晴れ。 Привет, мир! 😀 " * 3, "\t\tindent\r\n" * 5]
    return HFTokenizer.train_bpe(default_corpus_texts(max_bytes=300_000) + extra, vocab_size=700)


def _listing(directory) -> set[str]:
    return set(os.listdir(directory))


# --------------------------------------------------------------------------- ByteTokenizer


def test_byte_tokenizer_ids():
    tok = ByteTokenizer()
    assert isinstance(tok, Tokenizer)
    assert tok.vocab_size == len(tok) == 259
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (256, 257, 258)
    assert tok.encode("Aé") == [0x41, 0xC3, 0xA9]
    assert tok.encode("A", add_bos=True, add_eos=True) == [256, 0x41, 257]
    assert tok.encode("") == []
    # Special-token strings in text are plain bytes, never the special ids.
    assert tok.encode("<|bos|>") == list(b"<|bos|>")


@pytest.mark.parametrize("text", EDGE_CASES)
def test_byte_round_trip_edge_cases(text):
    tok = ByteTokenizer()
    assert tok.decode(tok.encode(text)) == text
    assert tok.decode(tok.encode(text, add_bos=True, add_eos=True), skip_special_tokens=True) == text


@HYPOTHESIS
@given(text=texts_strategy)
def test_byte_round_trip_any_text(text):
    tok = ByteTokenizer()
    ids = tok.encode(text)
    assert ids == list(text.encode("utf-8"))
    assert tok.decode(ids) == text


def test_byte_decode_invalid_utf8_replaces():
    tok = ByteTokenizer()
    assert tok.decode([0xFF, 0x41]) == "\ufffdA"
    assert tok.decode(tok.encode("é")[:1]) == "\ufffd"  # a cut multi-byte character
    # Bytes on either side of a special token decode separately.
    assert tok.decode([0xC3, 256, 0xA9, 0x41], skip_special_tokens=True) == "\ufffd\ufffdA"


def test_byte_decode_special_tokens():
    tok = ByteTokenizer()
    ids = [256, *b"hi", 258, 257]
    assert tok.decode(ids, skip_special_tokens=True) == "hi"
    assert tok.decode(ids) == "<|bos|>hi<|pad|><|eos|>"  # transformers' default keeps them


def test_decode_accepts_tensors():
    tok = ByteTokenizer()
    ids = tok.encode("tensor ✓")
    assert tok.decode(torch.tensor(ids)) == "tensor ✓"
    assert tok.decode(torch.tensor(ids, dtype=torch.int32)) == "tensor ✓"
    assert tok.decode(torch.tensor(65)) == "A"
    with pytest.raises(TypeError, match="integer tensor"):
        tok.decode(torch.tensor([65.0]))
    with pytest.raises(ValueError, match="1-D"):
        tok.decode(torch.tensor([[65]]))


def test_byte_save_load(tmp_path):
    directory = tmp_path / "nested" / "ckpt"
    ByteTokenizer().save(directory)
    assert _listing(directory) == {FASTLM_TOKENIZER_FILE}  # no temp files left, no HF file clash
    assert json.loads((directory / FASTLM_TOKENIZER_FILE).read_text())["type"] == "byte"
    for path in (directory, directory / FASTLM_TOKENIZER_FILE):
        loaded = load_tokenizer(path)
        assert isinstance(loaded, ByteTokenizer)
        assert loaded.encode("ok ✓") == ByteTokenizer().encode("ok ✓")


# --------------------------------------------------------------------------- trained BPE


def test_bpe_training(bpe):
    assert 259 < bpe.vocab_size <= 700
    assert (bpe.bos_token_id, bpe.eos_token_id, bpe.pad_token_id) == (0, 1, 2)
    assert (bpe.bos_token, bpe.eos_token, bpe.pad_token) == ("<|bos|>", "<|eos|>", "<|pad|>")
    # Merges were learned: Python source compresses well below one token per byte.
    text = "def __init__(self, name):\n        self.name = name\n        return None\n"
    assert len(bpe.encode(text)) < len(text.encode()) / 2
    ids = bpe.encode("x", add_bos=True, add_eos=True)
    assert ids[0] == 0 and ids[-1] == 1 and bpe.decode(ids, skip_special_tokens=True) == "x"
    assert bpe.decode(ids, skip_special_tokens=False) == "<|bos|>x<|eos|>"


@pytest.mark.parametrize("text", EDGE_CASES)
def test_bpe_round_trip_edge_cases(bpe, text):
    ids = bpe.encode(text)
    assert all(0 <= i < bpe.vocab_size for i in ids)
    assert bpe.decode(ids) == text


@HYPOTHESIS
@given(text=texts_strategy)
def test_bpe_round_trip_any_text(bpe, text):
    assert bpe.decode(bpe.encode(text)) == text


def test_bpe_special_strings_are_plain_text_by_default(bpe):
    ids = bpe.encode("a<|eos|>b")
    assert bpe.eos_token_id not in ids
    assert bpe.decode(ids) == "a<|eos|>b"
    parsing = HFTokenizer(bpe.backend, eos_token="<|eos|>", split_special_tokens=False)
    assert parsing.encode("a<|eos|>b") == [*bpe.encode("a"), bpe.eos_token_id, *bpe.encode("b")]
    # Wrapping with the other setting copied the backend instead of changing the shared one.
    assert bpe.encode("a<|eos|>b") == ids


def test_bpe_encode_batch(bpe):
    texts = ["one two", "", "  three\n", "四"]
    assert bpe.encode_batch(texts, add_eos=True) == [bpe.encode(t, add_eos=True) for t in texts]
    assert ByteTokenizer().encode_batch(texts) == [list(t.encode()) for t in texts]


def test_bpe_save_load(bpe, tmp_path):
    bpe.save(tmp_path / "tok")
    assert _listing(tmp_path / "tok") == {"tokenizer.json", "tokenizer_config.json", FASTLM_TOKENIZER_FILE}
    config = json.loads((tmp_path / "tok" / "tokenizer_config.json").read_text())
    assert (config["bos_token"], config["eos_token"], config["pad_token"]) == ("<|bos|>", "<|eos|>", "<|pad|>")
    for path in (tmp_path / "tok", tmp_path / "tok" / "tokenizer.json"):
        loaded = load_tokenizer(path)
        assert isinstance(loaded, HFTokenizer)
        assert loaded.vocab_size == bpe.vocab_size
        assert (loaded.bos_token_id, loaded.eos_token_id, loaded.pad_token_id) == (0, 1, 2)
        for text in EDGE_CASES:
            assert loaded.encode(text) == bpe.encode(text)
            assert loaded.decode(loaded.encode(text)) == text


def test_save_replaces_kind_in_same_directory(bpe, tmp_path):
    bpe.save(tmp_path)
    ByteTokenizer().save(tmp_path)  # the marker says which kind the directory now holds
    assert isinstance(load_tokenizer(tmp_path), ByteTokenizer)
    bpe.save(tmp_path)
    assert isinstance(load_tokenizer(tmp_path), HFTokenizer)


def test_save_is_atomic(bpe, tmp_path, monkeypatch):
    bpe.save(tmp_path)
    before = {name: (tmp_path / name).read_bytes() for name in _listing(tmp_path)}

    def failing_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(OSError, match="disk full"):
        ByteTokenizer().save(tmp_path)
    # The old files are intact and no temp file is left behind.
    assert {name: (tmp_path / name).read_bytes() for name in _listing(tmp_path)} == before


# --------------------------------------------------------------------------- Hugging Face interop


SAMPLES = ["Hello, world!", "  two  spaces\tand\ttabs\n", "def f():\n    return 1\n", "naïve café 😀 東京"]


def test_transformers_loads_our_directory(bpe, tmp_path):
    transformers = pytest.importorskip("transformers")
    bpe.save(tmp_path)
    hf = transformers.AutoTokenizer.from_pretrained(tmp_path)
    assert (hf.bos_token_id, hf.eos_token_id, hf.pad_token_id) == (0, 1, 2)
    for text in SAMPLES:
        ids = bpe.encode(text)
        assert hf.encode(text, add_special_tokens=False) == ids
        assert hf.decode(ids) == text


def test_load_directory_written_by_transformers(bpe, tmp_path):
    transformers = pytest.importorskip("transformers")
    hf = transformers.PreTrainedTokenizerFast(
        tokenizer_object=bpe.backend, bos_token="<|bos|>", eos_token="<|eos|>", pad_token="<|pad|>"
    )
    hf.save_pretrained(tmp_path)
    assert (tmp_path / "tokenizer.json").is_file() and not (tmp_path / FASTLM_TOKENIZER_FILE).exists()
    ours = load_tokenizer(tmp_path)
    assert isinstance(ours, HFTokenizer)
    assert (ours.bos_token_id, ours.eos_token_id, ours.pad_token_id) == (
        hf.bos_token_id,
        hf.eos_token_id,
        hf.pad_token_id,
    )
    for text in SAMPLES:
        assert ours.encode(text) == hf.encode(text, add_special_tokens=False) == bpe.encode(text)
        assert ours.decode(ours.encode(text)) == text


def _tiny_hf_tokenizer(special_tokens: list[str]):
    """A small byte-level BPE whose vocabulary holds ``special_tokens`` (and no fastlm ones)."""
    from tokenizers import decoders, models, pre_tokenizers, trainers

    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=special_tokens,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(["hello there, hello world"] * 10, trainer=trainer)
    return tok


def test_from_file_conventional_tokens(tmp_path):
    # GPT-2 style: one <|endoftext|> serves as bos and eos; no pad.
    (tmp_path / "gpt2").mkdir()
    (tmp_path / "gpt2" / "tokenizer.json").write_text(_tiny_hf_tokenizer(["<|endoftext|>"]).to_str())
    tok = load_tokenizer(tmp_path / "gpt2")
    assert tok.bos_token_id == tok.eos_token_id == 0
    assert tok.pad_token_id is None
    # Llama/Mistral style names.
    path = tmp_path / "llama.json"
    path.write_text(_tiny_hf_tokenizer(["<unk>", "<s>", "</s>", "<pad>"]).to_str())
    tok = HFTokenizer.from_file(path)
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (1, 2, 3)


def test_from_file_reads_config_files(tmp_path):
    (tmp_path / "tokenizer.json").write_text(_tiny_hf_tokenizer(["<s>", "</s>", "<pad>", "<|im_end|>"]).to_str())
    # tokenizer_config.json wins over special_tokens_map.json and over the conventional names;
    # values may be strings or AddedToken dicts; an explicit null means "no such token".
    (tmp_path / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "bos_token": None,
                "eos_token": {"__type": "AddedToken", "content": "<|im_end|>", "special": True},
                "chat_template": "{{ messages }}",
            }
        )
    )
    (tmp_path / "special_tokens_map.json").write_text(
        json.dumps({"bos_token": "<s>", "eos_token": "</s>", "pad_token": {"content": "</s>"}})
    )
    tok = load_tokenizer(tmp_path)
    assert tok.bos_token_id is None
    assert tok.eos_token_id == 3
    assert tok.pad_token_id == 1  # from special_tokens_map.json, not the conventional <pad>
    with pytest.raises(ValueError, match="has no bos token"):
        tok.encode("hi", add_bos=True)
    # Saving keeps the other config entries.
    tok.save(tmp_path / "resaved")
    config = json.loads((tmp_path / "resaved" / "tokenizer_config.json").read_text())
    assert config["chat_template"] == "{{ messages }}"
    assert config["bos_token"] is None
    again = load_tokenizer(tmp_path / "resaved")
    assert (again.bos_token_id, again.eos_token_id, again.pad_token_id) == (None, 3, 1)


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("make", [ByteTokenizer, "bpe"])
def test_encode_rejects_non_str(make, bpe):
    tok = bpe if make == "bpe" else make()
    with pytest.raises(TypeError, match="expects text as str, got bytes"):
        tok.encode(b"abc")
    with pytest.raises(TypeError, match="expects text as str, got int"):
        tok.encode(3)
    with pytest.raises(ValueError, match="cannot be encoded as UTF-8"):
        tok.encode("lone \ud800 surrogate")


@pytest.mark.parametrize("make", [ByteTokenizer, "bpe"])
def test_decode_rejects_out_of_range(make, bpe):
    tok = bpe if make == "bpe" else make()
    v = tok.vocab_size
    with pytest.raises(ValueError, match=f"token id {v} is out of range for vocab_size {v}"):
        tok.decode([1, v])
    with pytest.raises(ValueError, match=f"token id -1 is out of range for vocab_size {v}"):
        tok.decode(torch.tensor([-1]))
    with pytest.raises(TypeError, match="sequence of int ids"):
        tok.decode([1.5])


def test_train_bpe_bad_input():
    with pytest.raises(ValueError, match=r"vocab_size must be an int >= 259 .* got 258"):
        HFTokenizer.train_bpe(["some text"], vocab_size=258)
    with pytest.raises(ValueError, match="empty corpus"):
        HFTokenizer.train_bpe([], vocab_size=300)
    with pytest.raises(ValueError, match="empty corpus"):
        HFTokenizer.train_bpe(["", ""], vocab_size=300)
    with pytest.raises(TypeError, match="item 1 is bytes"):
        HFTokenizer.train_bpe(["ok", b"bytes"], vocab_size=300)


def test_unknown_special_token_is_added_as_transformers_does(bpe):
    # transformers adds a named special token missing from the vocabulary as a new token.
    tok = HFTokenizer(bpe.backend, bos_token="<nope>")
    assert tok.bos_token_id == bpe.vocab_size and tok.vocab_size == bpe.vocab_size + 1
    assert tok.encode("a<nope>", add_special_tokens=False) == [*bpe.encode("a"), bpe.vocab_size]


def test_load_tokenizer_missing(tmp_path):
    with pytest.raises(FileNotFoundError, match="tokenizer path not found: .*nowhere"):
        load_tokenizer(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match=f"looked for {FASTLM_TOKENIZER_FILE} and tokenizer.json"):
        load_tokenizer(tmp_path)
    with pytest.raises(FileNotFoundError, match="tokenizer file not found"):
        HFTokenizer.from_file(tmp_path / "tokenizer.json")
    (tmp_path / FASTLM_TOKENIZER_FILE).write_text(json.dumps({"type": "hf"}))
    with pytest.raises(FileNotFoundError, match="tokenizer.json does not exist"):
        load_tokenizer(tmp_path)
    (tmp_path / FASTLM_TOKENIZER_FILE).write_text(json.dumps({"type": "sentencepiece"}))
    with pytest.raises(ValueError, match="unknown tokenizer type 'sentencepiece'"):
        load_tokenizer(tmp_path)
