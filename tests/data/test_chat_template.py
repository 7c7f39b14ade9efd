"""Chat templates: bad input gives clear errors, the sandbox holds, template files are found
where transformers finds them, and {% generation %} spans match transformers' assistant masks."""

from __future__ import annotations

import json

import pytest

from fastlm.data import load_tokenizer
from fastlm.data.chat_template import ChatTemplateError, render_chat
from tests.data.hf_styles import CHATML_GENERATION_TEMPLATE, CHATML_TEMPLATE, build

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def chatml(tmp_path_factory):
    return build("chatml", tmp_path_factory.mktemp("chatml"))


def test_unknown_role_is_refused_by_the_template(chatml):
    tok = load_tokenizer(chatml)
    with pytest.raises(ChatTemplateError, match="refused the messages: Each message needs a user or assistant role"):
        tok.apply_chat_template([{"role": "wizard", "content": "hi"}])


def test_missing_content_is_refused_by_the_template(chatml):
    tok = load_tokenizer(chatml)
    with pytest.raises(ValueError, match="Each message needs a user or assistant role and a content"):
        tok.apply_chat_template([{"role": "user"}])
    # None-valued keys are dropped as transformers does, so content=None is "missing" too.
    with pytest.raises(ValueError, match="and a content"):
        tok.apply_chat_template([{"role": "user", "content": None}])


def test_template_that_raises(chatml):
    tok = load_tokenizer(chatml)
    messages = [{"role": "user", "content": "a"}, {"role": "system", "content": "late system"}]
    with pytest.raises(ChatTemplateError, match="The system message must come first"):
        tok.apply_chat_template(messages, tokenize=False)
    with pytest.raises(ChatTemplateError, match="custom refusal"):
        render_chat("{{ raise_exception('custom refusal') }}", [{"role": "user", "content": "x"}])


@pytest.mark.parametrize("messages, error, match", [
    ("hi", TypeError, "messages must be a list"),
    ([], ValueError, "messages is empty"),
    (["hi"], TypeError, r"messages\[0\] must be a dict"),
    ([{"content": "hi"}], ValueError, r"messages\[0\] has no 'role'"),
    ([{"role": "user", "content": object()}], TypeError, r"messages\[0\]\['content'\].*JSON values"),
])
def test_malformed_messages(chatml, messages, error, match):
    with pytest.raises(error, match=match):
        load_tokenizer(chatml).apply_chat_template(messages)


def test_no_chat_template(tmp_path):
    tok = load_tokenizer(build("gpt2", tmp_path / "gpt2"))
    assert tok.chat_template is None
    with pytest.raises(ValueError, match="has no chat template"):
        tok.apply_chat_template([{"role": "user", "content": "hi"}])
    # A template passed in works, as transformers' chat_template= argument does.
    assert tok.apply_chat_template([{"role": "user", "content": "hi"}], chat_template="{{ messages[0].content }}!",
                                   tokenize=False) == "hi!"


def test_syntax_error_names_the_line():
    with pytest.raises(ChatTemplateError, match="syntax error at line 2"):
        render_chat("ok\n{% if %}", [{"role": "user", "content": "x"}])


@pytest.mark.parametrize("attack", [
    "{{ messages.__class__.__mro__ }}",
    "{{ ''.__class__.__subclasses__() }}",
    "{% set ns = namespace() %}{% set ns._x = 1 %}",
    "{{ messages.append(1) }}",  # immutable sandbox
])
def test_sandbox(attack):
    try:
        out = render_chat(attack, [{"role": "user", "content": "x"}])
    except (ChatTemplateError, TypeError):
        return
    # The sandbox renders some unsafe attribute reads as undefined (empty); never as data.
    assert out.strip() == "", out


def test_globals_and_filters():
    out = render_chat("{{ strftime_now('%Y') }}|{{ {'k': 'é'} | tojson }}|{{ dict(a=1) | tojson }}"
                      "{% set ns = namespace(n=0) %}{% for m in messages %}{% set ns.n = ns.n + 1 %}{% endfor %}|{{ ns.n }}"
                      "|{{ bos_token }}|{{ extra }}",
                      [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}],
                      special_tokens={"bos_token": "<s>", "extra": "overridden"}, extra="kw")
    year, obj, made, count, bos, extra = out.split("|")
    assert len(year) == 4 and obj == '{"k": "é"}' and made == '{"a": 1}' and count == "2"
    assert (bos, extra) == ("<s>", "kw")


def test_template_files_as_transformers(tmp_path, chatml):
    """chat_template.jinja overrides the config entry; a list of named templates picks "default"."""
    directory = build("chatml", tmp_path / "files")
    (directory / "chat_template.jinja").write_text("JINJA{{ messages[0].content }}")
    ours, theirs = load_tokenizer(directory), transformers.AutoTokenizer.from_pretrained(str(directory))
    messages = [{"role": "user", "content": "hi"}]
    assert ours.apply_chat_template(messages, tokenize=False) == theirs.apply_chat_template(messages, tokenize=False) \
        == "JINJAhi"

    named = build("chatml", tmp_path / "named")
    config = json.loads((named / "tokenizer_config.json").read_text())
    config["chat_template"] = [{"name": "default", "template": CHATML_TEMPLATE},
                               {"name": "short", "template": "S{{ messages | length }}"}]
    (named / "tokenizer_config.json").write_text(json.dumps(config))
    ours, theirs = load_tokenizer(named), transformers.AutoTokenizer.from_pretrained(str(named))
    for name in (None, "short"):
        assert ours.apply_chat_template(messages, tokenize=False, chat_template=name) == \
            theirs.apply_chat_template(messages, tokenize=False, chat_template=name)
    # Saving and loading keeps both templates; transformers reads the saved directory the same.
    ours.save(tmp_path / "resaved")
    again = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "resaved"))
    assert again.apply_chat_template(messages, tokenize=False, chat_template="short") == "S1"
    assert load_tokenizer(tmp_path / "resaved").chat_template == ours.chat_template


def test_generation_spans_match_transformers_assistant_mask(tmp_path):
    directory = build("chatml", tmp_path / "gen")
    config = json.loads((directory / "tokenizer_config.json").read_text())
    (directory / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": CHATML_GENERATION_TEMPLATE}))
    ours, theirs = load_tokenizer(directory), transformers.AutoTokenizer.from_pretrained(str(directory))
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello 🦊!"},
                {"role": "user", "content": "More?"}, {"role": "assistant", "content": "Sure."}]
    from fastlm.data.chat import encode_chat_example

    ids, targets = encode_chat_example(ours, messages, max_len=10_000)
    out = theirs.apply_chat_template(messages, return_dict=True, return_assistant_tokens_mask=True)
    assert ids == out["input_ids"]
    assert [t != -100 for t in targets] == [bool(m) for m in out["assistant_masks"]]
