"""A model backend for lm-evaluation-harness (``lm_eval``), named ``fastlm``.

    python -m fastlm.eval.harness --model fastlm --model_args pretrained=DIR,dtype=float32 --tasks TASK ...

``python -m fastlm.eval.harness`` is the harness's own command line (same arguments) with this
backend registered. Importing this module registers it through the harness's registry
(``lm_eval.api.registry.register_model``), so in Python ``import fastlm.eval.harness`` then
``lm_eval.simple_evaluate(model="fastlm", ...)`` works too. fastlm also declares the
``lm_eval.models`` entry point (``fastlm = fastlm.eval.harness:FastLM``) for harness versions
that discover plugins that way; lm_eval 0.4.13 does not scan entry points, so there the plain
``lm_eval --model fastlm`` command cannot see the backend unless fastlm.eval.harness was imported.

Model arguments: ``pretrained`` (checkpoint folder, plain or quantized), ``dtype``
(auto | float32 | bfloat16 | float16), ``device``, ``batch_size``, ``max_length`` (default: the
model's context), ``max_gen_toks`` (256), ``adapter`` (a PEFT folder), ``add_bos_token`` (as the
``hf`` backend's: None uses the tokenizer's own post-processor), ``prefix_token_id``.

Requests are answered as the ``hf`` backend answers them — same encoding (the harness's
``TemplateLM``), same rolling windows (``get_rolling_token_windows`` with context 1), same stop
handling (``until`` plus the EOS string, text cut at the first stop) — computed by fastlm:
:func:`fastlm.eval.scoring.loglikelihood_tokens` and :func:`fastlm.generate`.
"""

from __future__ import annotations

import json
from pathlib import Path

try:
    # lm_eval.models first: the registry imports the harness's own backends (hf, ...) only while it
    # is empty, so registering fastlm first would hide them.
    import lm_eval.models  # noqa: F401
    from lm_eval.api.model import TemplateLM
    from lm_eval.api.registry import register_model
except ImportError:  # pragma: no cover - exercised only without lm_eval
    raise ImportError("fastlm.eval.harness needs lm-evaluation-harness: pip install lm_eval "
                      "(fastlm itself does not need it)") from None

import torch

from fastlm.eval.scoring import loglikelihood_tokens

_DTYPES = {"auto": None, "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _bool(value, name: str) -> bool | None:
    if value is None or isinstance(value, bool):
        return value
    text = str(value).lower()
    if text in ("true", "1", "yes"):
        return True
    if text in ("false", "0", "no"):
        return False
    raise ValueError(f"fastlm backend: {name} must be true or false, got {value!r}")


def _load_tokenizer(directory: str):
    """The checkpoint's tokenizer, reading special-token strings in text as transformers does."""
    from fastlm.data import HFTokenizer, load_tokenizer

    hf_file = Path(directory, "tokenizer.json")
    if hf_file.is_file():
        return HFTokenizer.from_file(hf_file, split_special_tokens=False)
    return load_tokenizer(directory)


@register_model("fastlm")
class FastLM(TemplateLM):
    """lm-evaluation-harness ``LM`` over a fastlm model (module docstring)."""

    def __init__(self, pretrained: str, dtype: str = "auto", device: str | None = None, batch_size=16,
                 max_length: int | None = None, max_gen_toks: int = 256, adapter: str | None = None,
                 add_bos_token=None, prefix_token_id: int | None = None, **unused) -> None:
        super().__init__()
        from fastlm.eval.cli import _load

        ignored = {k: v for k, v in unused.items() if v is not None and k not in ("max_batch_size",)}
        if ignored:
            raise ValueError(f"fastlm backend: unknown model_args {sorted(ignored)}; known: pretrained, dtype, "
                             "device, batch_size, max_length, max_gen_toks, adapter, add_bos_token, prefix_token_id")
        if str(dtype) not in _DTYPES:
            raise ValueError(f"fastlm backend: dtype must be one of {', '.join(_DTYPES)}, got {dtype!r}")
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        model, _ = _load(str(pretrained), _DTYPES[str(dtype)], device)
        if adapter:
            from fastlm import peft

            model = peft.from_pretrained(model, adapter).eval()
        self.model = model
        self.tokenizer = _load_tokenizer(str(pretrained))
        text = str(batch_size)
        self.batch_size = int(text.split(":")[0]) if text.split(":")[0].isdigit() else 16  # "auto": 16
        self._max_length = int(max_length) if max_length else model.config.max_position_embeddings
        self.max_gen_toks = int(max_gen_toks)
        self.add_bos_token = _bool(add_bos_token, "add_bos_token")
        self.custom_prefix_token_id = None if prefix_token_id is None else int(prefix_token_id)
        self.pretrained = str(pretrained)

    # ---- tokens

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        if self.custom_prefix_token_id is not None:
            return self.custom_prefix_token_id
        bos = self.tokenizer.bos_token_id
        return bos if bos is not None else self.tokenizer.eos_token_id

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def device(self):
        return self.model.device

    @property
    def tokenizer_name(self) -> str:
        return self.pretrained.replace("/", "__")

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, left_truncate_len: int | None = None,
                   **kwargs) -> list[int]:
        """As the ``hf`` backend: add_special_tokens, else add_bos_token, else the tokenizer's default
        (its post-processor, which may add BOS)."""
        flag = add_special_tokens if add_special_tokens is not None else self.add_bos_token
        backend = getattr(self.tokenizer, "backend", None)
        if backend is not None:
            ids = backend.encode(string, add_special_tokens=True if flag is None else flag).ids
        else:
            bos = self.tokenizer.bos_token_id
            ids = ([bos] if flag and bos is not None else []) + list(self.tokenizer.encode(string))
        return ids[-left_truncate_len:] if left_truncate_len else ids

    def tok_decode(self, tokens, skip_special_tokens: bool = True) -> str:
        if isinstance(tokens, int):
            tokens = [tokens]
        return self.tokenizer.decode(list(tokens), skip_special_tokens=skip_special_tokens)

    # ---- requests

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, override_bs: int | None = None):
        results = loglikelihood_tokens(self.model, [(ctx, cont) for _, ctx, cont in requests],
                                       batch_size=override_bs or self.batch_size, max_length=self.max_length,
                                       progress=False if disable_tqdm else None)
        for (key, _, _), answer in zip(requests, results):
            if key is not None:
                self.cache_hook.add_partial("loglikelihood", key, answer)
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Sum of log-probs of each whole text, in disjoint windows of max_length tokens, the first
        conditioned on the prefix token (the harness's rolling windows)."""
        from lm_eval import utils

        windows, owners = [], []
        for index, (string,) in enumerate(req.args for req in requests):
            for context, continuation in map(utils.make_disjoint_window, utils.get_rolling_token_windows(
                    token_list=self.tok_encode(string), prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length, context_len=1)):
                windows.append((None, context, continuation))
                owners.append(index)
        scores = self._loglikelihood_tokens(windows, disable_tqdm=disable_tqdm) if windows else []
        totals = [0.0] * len(requests)
        for index, (logprob, _) in zip(owners, scores):
            totals[index] += logprob
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Greedy (or sampled, with do_sample) continuations through fastlm.generate, cut at the first
        ``until`` string or EOS; grouped by generation settings, longest prompt first."""
        from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs, postprocess_generated_text

        from fastlm.generate import generate

        groups: dict[str, list[int]] = {}
        for i, req in enumerate(requests):
            groups.setdefault(json.dumps(req.args[1], sort_keys=True, default=str), []).append(i)
        out: list[str] = [""] * len(requests)
        eos_text = self.tok_decode(self.eot_token_id, skip_special_tokens=False)
        for indices in groups.values():
            kwargs = normalize_gen_kwargs(requests[indices[0]].args[1], self.max_gen_toks)
            until = handle_stop_sequences(kwargs.pop("until", None), eos=eos_text)
            max_new = kwargs.pop("max_gen_toks")
            do_sample = bool(kwargs.pop("do_sample", False))
            temperature = float(kwargs.pop("temperature", 0.0) or 0.0)
            room = self.max_length - max_new
            if room < 1:
                raise ValueError(f"fastlm backend: max_gen_toks={max_new} leaves no room in max_length="
                                 f"{self.max_length}")
            prompts = {i: self.tok_encode(requests[i].args[0], left_truncate_len=room) for i in indices}
            order = sorted(indices, key=lambda i: (-len(prompts[i]), requests[i].args[0]))
            for start in range(0, len(order), self.batch_size):
                rows = order[start:start + self.batch_size]
                result = generate(self.model, [prompts[i] or [self.prefix_token_id] for i in rows],
                                  max_new_tokens=max_new, do_sample=do_sample and temperature > 0,
                                  temperature=temperature if do_sample and temperature > 0 else 1.0,
                                  top_p=kwargs.get("top_p"), top_k=kwargs.get("top_k"),
                                  eos_token_id=self.eot_token_id, stop_strings=[s for s in until if s] or None,
                                  tokenizer=self.tokenizer)
                for i, seq in zip(rows, result):
                    new = seq[len(prompts[i] or [0]):].tolist()
                    text = postprocess_generated_text(self.tok_decode(new), until, None)
                    out[i] = text
                    self.cache_hook.add_partial("generate_until", requests[i].args, text)
        return out

    # ---- chat

    def chat_template(self, chat_template: bool | str = False) -> str | None:
        if not chat_template:
            return None
        template = getattr(self.tokenizer, "chat_template", None) or getattr(self.tokenizer, "hf_config", {}).get(
            "chat_template")
        if template is None:
            raise ValueError(f"fastlm backend: --apply_chat_template, but {self.pretrained} has no chat template")
        return template if isinstance(template, str) else json.dumps(template)

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        apply = getattr(self.tokenizer, "apply_chat_template", None)
        if apply is None:
            raise ValueError("fastlm backend: --apply_chat_template needs a fastlm tokenizer with "
                             "apply_chat_template (a newer fastlm)")
        return apply(chat_history, add_generation_prompt=add_generation_prompt, tokenize=False)


def main() -> None:
    """The harness's command line with the fastlm backend registered."""
    from lm_eval.__main__ import cli_evaluate

    cli_evaluate()


if __name__ == "__main__":
    main()
