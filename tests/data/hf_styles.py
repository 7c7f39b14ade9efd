"""Small tokenizers built with the ``tokenizers`` library in the styles of published checkpoints,
with chat templates written here in each family's style, saved as checkpoint directories
(``tokenizer.json`` + ``tokenizer_config.json``) that both fastlm and transformers load.

Styles: GPT-2 (byte-level BPE), Llama 2 (sentencepiece-like BPE with byte fallback and
``add_bos_token``), Llama 3 (byte-level BPE with a ``<|begin_of_text|>`` post-processor),
ChatML / Qwen2 (byte-level, no BOS, ``<|im_start|>``/``<|im_end|>``), Gemma (sentencepiece-like
without a prefix space, ``<bos>`` by ``add_bos_token``), and Mistral / Phi-3 templates on the
Llama 2 style (Phi-3 adds ``<|user|>``... tokens that strip the whitespace on their right).
"""

from __future__ import annotations

import json
from pathlib import Path

import tokenizers
from tokenizers import AddedToken, decoders, models, normalizers, pre_tokenizers, processors, trainers

CORPUS = [
    "The quick brown fox jumps over the lazy dog. The dog sleeps.",
    "Hello world! Hello there, how are you doing today?",
    "def main():\n    print('hello')\n    return 0\n",
    "Tokenizers split text into pieces; models read the pieces as ids.",
    "assistant user system message content role",
    "Numbers 12345 and 67890, dates like 2024-01-31.",
] * 20

LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")

LLAMA3_TEMPLATE = """{{- bos_token }}
{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content'] | trim %}
    {%- set messages = messages[1:] %}
{%- else %}
    {%- set system_message = "" %}
{%- endif %}
{{- '<|start_header_id|>system<|end_header_id|>\\n\\n' }}
{{- 'Today Date: ' + strftime_now('%d %b %Y') + '\\n\\n' }}
{{- system_message + '<|eot_id|>' }}
{%- for message in messages %}
    {%- if message['role'] not in ['user', 'assistant'] %}
        {{- raise_exception('Unknown role: ' + message['role']) }}
    {%- endif %}
    {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' }}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}
{%- endif %}
"""

QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
               r"|\s*[\r\n]+|\s+(?!\S)|\s+")

CHATML_TEMPLATE = """{%- if tools %}
    {{- '<|im_start|>system\\n' }}
    {%- if messages[0]['role'] == 'system' %}{{- messages[0]['content'] + '\\n\\n' }}{%- endif %}
    {{- 'Tools:' }}
    {%- for tool in tools %}{{- '\\n' + (tool | tojson) }}{%- endfor %}
    {{- '<|im_end|>\\n' }}
{%- elif messages[0]['role'] == 'system' %}
    {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}
{%- else %}
    {{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}
{%- endif %}
{%- for message in messages %}
    {%- if message.role == 'system' %}
        {%- if not loop.first %}{{- raise_exception('The system message must come first') }}{%- endif %}
        {%- continue %}
    {%- endif %}
    {%- if message.role not in ('user', 'assistant') or message.content is not defined %}
        {{- raise_exception('Each message needs a user or assistant role and a content') }}
    {%- endif %}
    {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
{%- endif %}
"""

GEMMA_TEMPLATE = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}"
    "{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if (message['role'] == 'assistant') %}{% set role = 'model' %}{% else %}{% set role = message['role'] %}{% endif %}"
    "{{ '<start_of_turn>' + role + '\\n' + message['content'] | trim + '<end_of_turn>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{'<start_of_turn>model\\n'}}{% endif %}"
)

MISTRAL_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token }}"
    "{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}"
)

PHI3_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'system' %}{{'<|system|>\\n' + message['content'] + '<|end|>\\n'}}"
    "{% elif message['role'] == 'user' %}{{'<|user|>\\n' + message['content'] + '<|end|>\\n'}}"
    "{% elif message['role'] == 'assistant' %}{{'<|assistant|>\\n' + message['content'] + '<|end|>\\n'}}"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% else %}{{ eos_token }}{% endif %}"
)

# Assistant text marked with {% generation %} (as TRL-ready templates do).
CHATML_GENERATION_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{% if message['role'] == 'assistant' %}{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}"
    "{% else %}{{ message['content'] + '<|im_end|>' }}{% endif %}{{ '\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def _byte_level(specials: list[str], split: pre_tokenizers.PreTokenizer | None = None, nfc: bool = False,
                vocab_size: int = 600) -> tokenizers.Tokenizer:
    tok = tokenizers.Tokenizer(models.BPE())
    if nfc:
        tok.normalizer = normalizers.NFC()
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=split is None)
    tok.pre_tokenizer = byte_level if split is None else pre_tokenizers.Sequence([split, byte_level])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS, trainer=trainer)
    return tok


def _sentencepiece_like(specials: list[str], prefix_space: bool, vocab_size: int = 400) -> tokenizers.Tokenizer:
    """BPE over '▁'-joined text with <0xXX> byte fallback tokens, as converted sentencepiece models are."""
    tok = tokenizers.Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    steps = [normalizers.Prepend("▁")] if prefix_space else []
    tok.normalizer = normalizers.Sequence([*steps, normalizers.Replace(" ", "▁")])
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False,
                                  limit_alphabet=60)
    tok.train_from_iterator(CORPUS, trainer=trainer)
    data = json.loads(tok.to_str())
    vocab = data["model"]["vocab"]
    for byte in range(256):
        vocab.setdefault(f"<0x{byte:02X}>", len(vocab))
    data["model"]["byte_fallback"] = True
    tok = tokenizers.Tokenizer.from_str(json.dumps(data))
    strip = [decoders.Strip(" ", 1, 0)] if prefix_space else []
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), *strip])
    return tok


def _bos_post_processor(bos: str, bos_id: int) -> processors.TemplateProcessing:
    """``<bos> $A`` as in the tokenizer.json of Llama 2 and Gemma checkpoints."""
    return processors.TemplateProcessing(single=f"{bos}:0 $A:0", pair=f"{bos}:0 $A:0 {bos}:1 $B:1",
                                         special_tokens=[(bos, bos_id)])


def _write(directory: Path, tok: tokenizers.Tokenizer, config: dict) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    tok.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(
        json.dumps({"tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": False, **config}))
    return directory


def build(style: str, directory: Path) -> Path:
    """Write the tokenizer of ``style`` into ``directory``; returns it."""
    if style == "gpt2":
        tok = _byte_level(["<|endoftext|>"])
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
        tok.add_tokens([AddedToken(" plain added", special=False, normalized=False)])
        return _write(directory, tok, {"bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>",
                                       "unk_token": "<|endoftext|>"})
    if style == "llama3":
        specials = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
        split = pre_tokenizers.Split(tokenizers.Regex(LLAMA3_SPLIT), behavior="isolated", invert=False)
        tok = _byte_level(specials, split=split)
        tok.post_processor = processors.Sequence([
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(single="<|begin_of_text|> $A", pair="<|begin_of_text|> $A <|begin_of_text|> $B:1",
                                          special_tokens=[("<|begin_of_text|>", 0)])])
        return _write(directory, tok, {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>",
                                       "chat_template": LLAMA3_TEMPLATE})
    if style == "chatml":
        split = pre_tokenizers.Split(tokenizers.Regex(QWEN2_SPLIT), behavior="isolated", invert=False)
        tok = _byte_level(["<|endoftext|>", "<|im_start|>", "<|im_end|>"], split=split, nfc=True)
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
        return _write(directory, tok, {"bos_token": None, "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>",
                                       "unk_token": None, "chat_template": CHATML_TEMPLATE, "add_bos_token": False})
    if style in ("llama2", "mistral", "phi3"):
        tok = _sentencepiece_like(["<unk>", "<s>", "</s>"], prefix_space=True)
        tok.post_processor = _bos_post_processor("<s>", 1)
        config = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "add_bos_token": True,
                  "add_eos_token": False, "legacy": False}
        if style == "mistral":
            config["chat_template"] = MISTRAL_TEMPLATE
        if style == "phi3":
            tok.add_special_tokens([AddedToken(t, special=False, rstrip=True, normalized=False)
                                    for t in ("<|system|>", "<|user|>", "<|assistant|>")])
            tok.add_special_tokens([AddedToken("<|end|>", special=True, rstrip=True, normalized=False)])
            config.update(eos_token="<|end|>", pad_token="<|endoftext|>", chat_template=PHI3_TEMPLATE)
        return _write(directory, tok, config)
    if style == "gemma":
        tok = _sentencepiece_like(["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"],
                                  prefix_space=False)
        tok.post_processor = _bos_post_processor("<bos>", 2)
        return _write(directory, tok, {"bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>",
                                       "unk_token": "<unk>", "add_bos_token": True, "add_eos_token": False,
                                       "additional_special_tokens": ["<start_of_turn>", "<end_of_turn>"],
                                       "chat_template": GEMMA_TEMPLATE})
    raise ValueError(f"unknown style {style!r}")


STYLES = ("gpt2", "llama2", "llama3", "chatml", "gemma", "mistral", "phi3")
