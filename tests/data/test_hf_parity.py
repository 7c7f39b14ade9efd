"""fastlm's tokenizer and chat templates against transformers on the same directories.

Each style (see hf_styles.py) is loaded by ``fastlm.load_tokenizer`` and by transformers'
``PreTrainedTokenizerFast.from_pretrained`` (the class named in tokenizer_config.json, which
``AutoTokenizer`` picks too); ids with and without special tokens, special tokens inside the
text, BOS/EOS, decoding with and without ``skip_special_tokens``, rendered chat templates and
their ids must be identical.
"""

from __future__ import annotations

import pytest

transformers = pytest.importorskip("transformers")

from fastlm.data import load_tokenizer  # noqa: E402
from tests.data.hf_styles import STYLES, build  # noqa: E402

TEXTS = [
    "",
    "Hello world!",
    " leading space and  double  spaces ",
    "line one\nline two\n\n\tindented",
    "unicode: café, naïve, 中文, emoji 🦊👍🏽, e\u0301 (combining)",
    "The quick brown fox<|endoftext|>jumps",
    "<s>hello</s> <unk> [INST] hi [/INST]",
    "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nhi<|eot_id|>",
    "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n",
    "<bos><start_of_turn>user\nhi<end_of_turn>\n<eos><pad>",
    "<|user|>\n  hi <|end|>\n<|assistant|>   x",
    "some text with a plain added token in it",
    "numbers 1234567 and symbols #$%^&*()",
]

CHATS = [
    [{"role": "user", "content": "Hello there!"}],
    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello! How can I help?"},
     {"role": "user", "content": "  Tell me about foxes. 🦊  "}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "2+2?"},
     {"role": "assistant", "content": "4"}],
]


@pytest.fixture(scope="module", params=STYLES)
def pair(request, tmp_path_factory):
    directory = build(request.param, tmp_path_factory.mktemp(request.param))
    ours = load_tokenizer(directory)
    theirs = transformers.AutoTokenizer.from_pretrained(str(directory))
    assert isinstance(theirs, transformers.PreTrainedTokenizerFast)
    return request.param, ours, theirs


def test_special_token_ids(pair):
    style, ours, theirs = pair
    assert ours.bos_token_id == theirs.bos_token_id
    assert ours.eos_token_id == theirs.eos_token_id
    if theirs.pad_token_id is not None:
        assert ours.pad_token_id == theirs.pad_token_id
    assert ours.special_tokens_map == theirs.special_tokens_map
    assert len(ours) == len(theirs)


@pytest.mark.parametrize("text", TEXTS)
def test_encode_matches(pair, text):
    style, ours, theirs = pair
    assert ours.encode(text) == theirs(text).input_ids
    assert ours.encode(text, add_special_tokens=False) == theirs(text, add_special_tokens=False).input_ids
    assert ours.encode_batch([text, "x"]) == theirs([text, "x"]).input_ids


def test_bos_as_transformers(pair):
    style, ours, theirs = pair
    ids = ours.encode("Hello world")
    expect_bos = style in ("llama2", "llama3", "gemma", "mistral", "phi3")
    assert (ids[0] == ours.bos_token_id) is expect_bos
    assert ids.count(ours.bos_token_id) == int(expect_bos)
    if ours.bos_token_id is not None:  # add_bos never doubles the BOS the tokenizer adds itself
        assert ours.encode("Hello world", add_bos=True).count(ours.bos_token_id) == 1


def test_special_tokens_inside_text_are_single_ids(pair):
    style, ours, theirs = pair
    for token in theirs.all_special_tokens:
        ids = ours.encode(f"a{token}b", add_special_tokens=False)
        assert ours.token_to_id(token) in ids
        assert ids == theirs(f"a{token}b", add_special_tokens=False).input_ids
        # split_special_tokens=True encodes the string as text, as transformers' flag does
        assert ours.encode(token, add_special_tokens=False, split_special_tokens=True) == \
            theirs(token, add_special_tokens=False, split_special_tokens=True).input_ids


@pytest.mark.parametrize("text", TEXTS)
def test_decode_matches(pair, text):
    style, ours, theirs = pair
    ids = theirs(text).input_ids
    assert ours.decode(ids) == theirs.decode(ids)
    assert ours.decode(ids, skip_special_tokens=True) == theirs.decode(ids, skip_special_tokens=True)


def test_decode_every_id(pair):
    style, ours, theirs = pair
    ids = list(range(len(theirs)))
    assert ours.decode(ids) == theirs.decode(ids)
    assert ours.decode(ids, skip_special_tokens=True) == theirs.decode(ids, skip_special_tokens=True)


@pytest.mark.parametrize("chat", range(len(CHATS)))
@pytest.mark.parametrize("generation_prompt", [False, True])
def test_chat_template_matches(pair, chat, generation_prompt):
    style, ours, theirs = pair
    if theirs.chat_template is None:
        assert ours.chat_template is None
        return
    messages = CHATS[chat]
    try:
        expected = theirs.apply_chat_template(messages, add_generation_prompt=generation_prompt, tokenize=False)
    except Exception as err:  # noqa: BLE001 - the template refuses these messages: so must ours
        with pytest.raises(ValueError, match=str(err)[:30].replace("(", r"\(").replace(".", r"\.")):
            ours.apply_chat_template(messages, add_generation_prompt=generation_prompt, tokenize=False)
        return
    assert ours.apply_chat_template(messages, add_generation_prompt=generation_prompt, tokenize=False) == expected
    ids = theirs.apply_chat_template(messages, add_generation_prompt=generation_prompt, tokenize=True,
                                     return_dict=False)
    assert ours.apply_chat_template(messages, add_generation_prompt=generation_prompt) == ids
    # Control tokens of the template are single special ids, never their text pieces.
    if style == "chatml":
        assert ids.count(ours.token_to_id("<|im_start|>")) == expected.count("<|im_start|>")
    if style == "llama3":
        assert ids[0] == ours.bos_token_id and ids.count(ours.bos_token_id) == 1


def test_chatml_tools_and_kwargs(tmp_path):
    directory = build("chatml", tmp_path / "t")
    ours, theirs = load_tokenizer(directory), transformers.AutoTokenizer.from_pretrained(str(directory))
    tools = [{"type": "function", "function": {"name": "météo", "parameters": {"city": "string"}}}]
    messages = [{"role": "system", "content": "Use tools."}, {"role": "user", "content": "Weather in Zürich?"}]
    expected = theirs.apply_chat_template(messages, tools=tools, tokenize=False, add_generation_prompt=True)
    assert "météo" in expected  # tojson does not escape non-ASCII
    assert ours.apply_chat_template(messages, tools=tools, tokenize=False, add_generation_prompt=True) == expected


@pytest.mark.parametrize("style, cls", [("gpt2", "GPT2Tokenizer"), ("chatml", "Qwen2Tokenizer"),
                                        ("gemma", "GemmaTokenizer")])
def test_model_specific_tokenizer_classes(tmp_path, style, cls):
    """With the class published checkpoints name (which transformers 5 builds its own pipeline for)."""
    import json

    directory = build(style, tmp_path / style)
    config = json.loads((directory / "tokenizer_config.json").read_text())
    (directory / "tokenizer_config.json").write_text(json.dumps({**config, "tokenizer_class": cls}))
    ours, theirs = load_tokenizer(directory), transformers.AutoTokenizer.from_pretrained(str(directory))
    assert type(theirs).__name__ == cls
    for text in TEXTS:
        ids = theirs(text).input_ids
        assert ours.encode(text) == ids
        assert ours.decode(ids) == theirs.decode(ids)
    if theirs.chat_template is not None:
        for messages in CHATS[:2]:
            assert ours.apply_chat_template(messages, add_generation_prompt=True) == theirs.apply_chat_template(
                messages, add_generation_prompt=True, return_dict=False)
