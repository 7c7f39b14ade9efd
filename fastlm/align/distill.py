"""Knowledge distillation: a frozen teacher trains a (usually smaller) student.

Two modes, both on the shared engine :class:`fastlm.train.trainer.Trainer` (checkpoints of the
student, exact resume, kill -9 safety, metrics.jsonl, progress bar, torchrun DDP):

``logits`` (token-level, Hinton et al. 2015): per target token t with label y_t, teacher logits
z^t = h^t·W_tᵀ and student logits z^s = h^s·W_sᵀ, p^T = softmax(z / T),

    ℓ_t = α · T² · D(p_t^T, p_s^T) + (1 − α) · CE(z^s, y_t)

with D = KL(p_t‖p_s) (``forward_kl``), KL(p_s‖p_t) (``reverse_kl``) or the generalised JSD
β·KL(p_t‖m) + (1−β)·KL(p_s‖m), m = β·p_t + (1−β)·p_s (``jsd``); the step's loss is the mean of
ℓ_t over every target token of the step (all micro-batches and processes, as the trainer
normalises). T² keeps the soft-target gradients at the scale of the hard-label ones when T
changes. Computed by :func:`fastlm.ops.linear_distillation_loss` from the final hidden states
and head weights of both models (chunked: neither (N, V) logits tensor is built). The teacher
runs per micro-batch in eval mode under ``no_grad`` (and the trainer's bf16/fp16 autocast).
Targets are the tokens the batch source labels: every next token of a text corpus, or the
completion tokens of prompt/completion rows (prompt and padding positions are ignored).
Validation (``val_loss``, ``val_perplexity``) is the student's plain cross-entropy on held-out
labels, so it is a perplexity whatever α, T and D are.

``sequence`` (Kim & Rush 2016): the teacher generates a completion for each prompt (batched
``fastlm.generate``, greedy or sampled), written to ``<out>/teacher_completions.jsonl``; the
student is fine-tuned on them with fastlm's fine-tuning data path (loss on completions).

Teacher and student may differ in depth, width and heads, but must share the vocabulary: see
:func:`check_compatible` for what is compared.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from fastlm import ops
from fastlm.align.data import read_prompts
from fastlm._files import atomic_write_text
from fastlm._naming import shown
from fastlm.config import PRESETS, preset
from fastlm.data import Tokenizer, load_tokenizer, read_texts, split_train_val
from fastlm.data.chat import resolve_template
from fastlm.data.dataset import tokenize_stream
from fastlm.generate import generate
from fastlm.io import from_pretrained, load_config
from fastlm.io.validate import check_model_dir
from fastlm.model import Model
from fastlm.train import distributed, rundir
from fastlm.train.data import TEMPLATES, TRUNCATION_SIDES, PackedSource
from fastlm.train.recipes import RecipeOutput, _trainer_settings, prepare_finetune
from fastlm.train.trainer import _LAYOUT_KEYS, Trainer, TrainerConfig

logger = logging.getLogger(__name__)

DIVERGENCES = ("forward_kl", "reverse_kl", "jsd")
MODES = ("logits", "sequence")
DATA_FORMATS = ("auto", "text", "prompt-completion")
#: The teacher's completions of a sequence-level run, inside its ``out``.
COMPLETIONS_FILE = "teacher_completions.jsonl"
#: Settings of a distillation run whose change on ``resume`` is refused (besides the trainer's).
_REFUSED_ON_RESUME = ("mode", "teacher", "student", "preset", "temperature", "divergence", "jsd_beta", "alpha",
                      "max_new_tokens", "do_sample", "gen_temperature", "top_k", "top_p", "data_format")


@dataclass
class DistillConfig:
    """The distillation loss: ``temperature`` T > 0, ``divergence`` in :data:`DIVERGENCES`,
    ``jsd_beta`` β in (0, 1) (jsd only), ``alpha`` α in [0, 1] (1: soft targets only,
    0: hard labels only). See the module docstring for the formula."""

    temperature: float = 1.0  # as Liger's distillation losses (TRL's GKD: 0.9); see bench/results/align/distill.md
    divergence: str = "forward_kl"
    jsd_beta: float = 0.5
    alpha: float = 0.5

    def __post_init__(self) -> None:
        if self.divergence not in DIVERGENCES:
            raise ValueError(f"{shown('divergence')} must be one of {' | '.join(DIVERGENCES)}, got {self.divergence!r}")
        for name in ("temperature", "jsd_beta", "alpha"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ValueError(f"{shown(name)} must be a number, got {value!r}")
        if not self.temperature > 0:
            raise ValueError(f"{shown('temperature')} must be > 0, got {self.temperature}")
        if not 0 <= self.alpha <= 1:
            raise ValueError(f"{shown('alpha')} must be in [0, 1], got {self.alpha}")
        if not 0 < self.jsd_beta < 1:
            raise ValueError(f"{shown('jsd_beta')} must be in (0, 1) (its limits are the two KLs: use "
                             f"{shown('divergence')} forward_kl or reverse_kl), got {self.jsd_beta}")


# ---- the teacher/student pair -------------------------------------------------------------------


def _tokenizer_sections(tokenizer: Tokenizer) -> dict[str, Any]:
    """What defines a tokenizer's ids: for a Hugging Face tokenizer, its tokenizer.json sections
    (model: vocabulary + merges; added_tokens; normalizer, pre_tokenizer, post_processor,
    decoder); for the byte tokenizer, its type (its ids are fixed)."""
    backend = getattr(tokenizer, "backend", None)
    if backend is None:
        return {"type": type(tokenizer).__name__}
    spec = json.loads(backend.to_str())
    sections = {k: spec.get(k) for k in ("model", "added_tokens", "normalizer", "pre_tokenizer", "post_processor",
                                         "decoder")}
    return {"type": type(tokenizer).__name__, **sections}


def _first_vocab_difference(a: dict, b: dict) -> str:
    va, vb = (a.get("model") or {}).get("vocab"), (b.get("model") or {}).get("vocab")
    if isinstance(va, dict) and isinstance(vb, dict) and va != vb:
        for token in sorted(set(va) | set(vb), key=lambda t: min(va.get(t, 1 << 60), vb.get(t, 1 << 60))):
            if va.get(token) != vb.get(token):
                return f" (first difference: token {token!r} has id {va.get(token)} in the teacher's, " \
                       f"{vb.get(token)} in the student's)"
    return ""


def check_compatible(teacher: Model, student: Model, teacher_tokenizer: Tokenizer | None = None,
                     student_tokenizer: Tokenizer | None = None) -> None:
    """Refuse (ValueError) a teacher/student pair the token-level loss cannot compare. Compared:

    1. the models' ``vocab_size`` (the rows of both heads: p_t and p_s must be over the same ids);
    2. their configs' ``bos_token_id``, ``eos_token_id``, ``pad_token_id`` (where both set);
    3. with both tokenizers given: their type, vocabulary size, bos/eos/pad ids and special-token
       strings, and what maps text to ids (tokenizer.json's vocabulary, merges, added tokens,
       normalizer, pre-tokenizer, post-processor and decoder);
    Depth, width, heads, MLP size and family may differ; a final logit soft-cap (Gemma 2) is
    applied by the fused loss (its ``student_softcap`` / ``teacher_softcap``).
    """
    for role, model in (("teacher", teacher), ("student", student)):
        if not isinstance(model, Model):
            raise TypeError(f"distillation: the {role} must be a fastlm Model, got {type(model).__name__}")
    tc, sc = teacher.config, student.config
    if tc.vocab_size != sc.vocab_size:
        raise ValueError(f"distillation: the teacher's vocabulary has {tc.vocab_size} ids and the student's "
                         f"{sc.vocab_size}; teacher and student must share the tokenizer (give the student the "
                         "teacher's vocab_size, or use --preset, which builds the student on the teacher's)")
    for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
        t, s = getattr(tc, name), getattr(sc, name)
        if t is not None and s is not None and t != s:
            raise ValueError(f"distillation: {name} is {t} in the teacher's config.json and {s} in the "
                             "student's; they must share the tokenizer")
    if teacher_tokenizer is None or student_tokenizer is None:
        return
    tt, st = teacher_tokenizer, student_tokenizer
    for name in ("vocab_size", "bos_token_id", "eos_token_id", "pad_token_id", "special_tokens_map"):
        t, s = getattr(tt, name), getattr(st, name)
        if t != s:
            raise ValueError(f"distillation: the tokenizers differ in {name}: {t!r} (teacher) vs {s!r} (student); "
                             "teacher and student must share the tokenizer")
    ts, ss = _tokenizer_sections(tt), _tokenizer_sections(st)
    for key in ts:
        if ts[key] != ss.get(key):
            what = "type" if key == "type" else f"tokenizer.json {key!r} section"
            raise ValueError(f"distillation: the tokenizers differ in their {what}{_first_vocab_difference(ts, ss)}; "
                             "the same text would give different ids: teacher and student must share the tokenizer")


# ---- the trainer -------------------------------------------------------------------------------


class DistillTrainer(Trainer):
    """:class:`Trainer` of ``student`` whose training loss is the distillation loss against the
    frozen ``teacher`` (module docstring); checkpoints hold the student. The teacher is moved to
    the training device, put in eval mode and given ``requires_grad=False``; it is not wrapped
    by DDP (each process holds a copy). FSDP is refused (the fused loss needs the whole head)."""

    def __init__(self, student: Model, teacher: Model, train_source, config: TrainerConfig,
                 distill: DistillConfig | None = None, *, val_source=None, extra_files=None) -> None:
        check_compatible(teacher, student)
        if config.fsdp:
            raise ValueError(f"distillation: {shown('fsdp')} is not supported (the fused distillation loss needs the "
                             "student's whole head weight); several processes train with DDP")
        if teacher is student:
            raise ValueError("distillation: the teacher and the student are the same module")
        super().__init__(student, train_source, config, val_source=val_source, extra_files=extra_files)
        self.teacher = teacher.requires_grad_(False).eval()
        self.distill = distill if distill is not None else DistillConfig()
        self._teacher_head: tuple[torch.dtype, torch.Tensor] | None = None

    def _build(self) -> None:
        super()._build()
        self.teacher.to(self.info.device).eval()
        self._teacher_head = None

    def _teacher_weight(self, dtype: torch.dtype) -> torch.Tensor:
        """The teacher's head weight (V, Ht) in ``dtype``, cast once (the teacher never changes)."""
        weight = self.teacher.lm_head.weight
        if weight.dtype == dtype:
            return weight
        if self._teacher_head is None or self._teacher_head[0] != dtype:
            self._teacher_head = (dtype, weight.detach().to(dtype))
        return self._teacher_head[1]

    def _loss_sum(self, batch: dict[str, Any], num_targets: int) -> torch.Tensor:
        """Σ over the micro-batch's target tokens of ℓ_t (module docstring); in eval mode (validation)
        the student's cross-entropy, as the base trainer computes it."""
        if not self.model.training:
            return super()._loss_sum(batch, num_targets)
        layout = {k: batch[k] for k in _LAYOUT_KEYS if k in batch}
        if not num_targets:  # nothing to distil: a zero that keeps the student's graph
            with self._autocast():
                hidden = self.forward(batch["input_ids"], return_hidden=True, validate=False, **layout)
            return hidden.float().sum() * 0.0
        labels = batch["labels"].flatten()  # (N,), IGNORE_INDEX where no loss is taken
        with torch.no_grad(), self._autocast():
            teacher_hidden = self.teacher(batch["input_ids"], return_hidden=True, validate=False, **layout)
        teacher_hidden = teacher_hidden.flatten(0, 1)  # (N, Ht)
        d = self.distill
        with self._autocast():
            hidden = self.forward(batch["input_ids"], return_hidden=True, validate=False, **layout)  # (B, T, Hs)
            mean = ops.linear_distillation_loss(
                hidden.flatten(0, 1), self._head_weight(hidden.dtype), teacher_hidden,
                self._teacher_weight(teacher_hidden.dtype), labels, temperature=d.temperature,
                divergence=d.divergence, jsd_beta=d.jsd_beta, alpha=d.alpha, validate=False,
                student_softcap=self.model.config.final_softcap, teacher_softcap=self.teacher.config.final_softcap)
        return mean.float() * num_targets


# ---- sequence-level: the teacher's completions ---------------------------------------------------


def _prompt_ids(tokenizer: Tokenizer, prompt: str | list[dict], template: str) -> list[int]:
    """The ids the student will see before the completion, rendered as fine-tuning renders them
    (fastlm.train.data / fastlm.data.chat): the chat template with a generation prompt, or the
    plain template's prompt format."""
    if template == "chat":
        messages = prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}]
        return list(tokenizer.apply_chat_template(messages, add_generation_prompt=True))
    if isinstance(prompt, list):
        raise ValueError(f'"messages" prompts need --template chat (got --template {template})')
    return tokenizer.encode(TEMPLATES[template][0].format(prompt=prompt), add_bos=tokenizer.bos_token_id is not None,
                            split_special_tokens=False if template == "chatml" else None)


@torch.no_grad()
def teacher_completions(teacher: Model, tokenizer: Tokenizer, prompts: Sequence[str | list[dict]], *,
                        template: str, max_new_tokens: int, do_sample: bool = False, temperature: float = 1.0,
                        top_k: int | None = None, top_p: float | None = None, batch_size: int = 16,
                        seed: int = 0) -> list[dict]:
    """The teacher's completion of each prompt, as fine-tuning rows (``{"prompt", "completion"}``, or
    ``{"messages"}`` with the answer appended): ``fastlm.generate`` on batches of ``batch_size``
    prompts (ragged: each row as it would be alone), greedy or sampled (batch i seeded by seed + i),
    stopping at the end-of-sequence token (and ``<|im_end|>`` for chatml); special tokens are
    dropped from the text (the template adds its own when the student is trained)."""
    teacher.eval()
    context = teacher.config.context_length
    stops = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    if template == "chatml":
        stops += tokenizer.encode("<|im_end|>", add_special_tokens=False, split_special_tokens=False)
    encoded = []
    for n, prompt in enumerate(prompts):
        ids = _prompt_ids(tokenizer, prompt, template)
        if len(ids) + max_new_tokens > context:
            raise ValueError(f"prompt {n} has {len(ids)} tokens: with {shown('max_new_tokens')} {max_new_tokens} it "
                             f"exceeds the teacher's context of {context}; lower {shown('max_new_tokens')}")
        encoded.append(ids)
    rows = []
    for start in range(0, len(encoded), batch_size):
        chunk = encoded[start:start + batch_size]
        sampling = dict(do_sample=True, temperature=temperature, top_k=top_k, top_p=top_p,
                        seed=seed + start // batch_size) if do_sample else dict(do_sample=False)
        outputs = generate(teacher, chunk, max_new_tokens=max_new_tokens, eos_token_id=stops or None,
                           pad_token_id=tokenizer.pad_token_id, **sampling)
        for ids, out in zip(chunk, outputs):
            text = tokenizer.decode(out[len(ids):].tolist(), skip_special_tokens=True)
            prompt = prompts[len(rows)]
            rows.append({"prompt": prompt, "completion": text} if isinstance(prompt, str)
                        else {"messages": [*prompt, {"role": "assistant", "content": text}]})
    return rows


# ---- the recipe ----------------------------------------------------------------------------------


def _check_int(name: str, value: object, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{shown(name)} must be an integer >= {low}, got {value!r}")


def _looks_like_prompt_completion(data: Sequence[str]) -> bool:
    """``data_format="auto"``: one .jsonl file whose first row has "prompt" or "messages"."""
    if len(data) != 1 or Path(data[0]).suffix != ".jsonl" or not Path(data[0]).is_file():
        return False
    with open(data[0], encoding="utf-8", errors="replace") as f:
        for line in f:
            if line.strip():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    return False
                return isinstance(row, dict) and ("prompt" in row or "messages" in row)
    return False


def _check_resume_settings(out: Path, settings: dict[str, Any]) -> None:
    """Refuse resuming a run whose distillation settings (teacher, loss, generation) changed:
    rundir's list holds the trainers' settings only."""
    path = out / rundir.RUN_FILE
    if not path.is_file():
        return
    try:
        saved = json.loads(path.read_text(encoding="utf-8"))["settings"]
    except (ValueError, KeyError, TypeError):
        return  # rundir.check_resume reports the damaged file
    changed = [f"{shown(k)} is {settings.get(k)!r} now, {saved.get(k)!r} in the run" for k in _REFUSED_ON_RESUME
               if k in saved and json.loads(json.dumps(saved[k])) != json.loads(json.dumps(settings.get(k)))]
    if changed:
        raise rundir.ResumeMismatchError(f"cannot resume the distillation run in {out}: " + "; ".join(changed))


_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def distill(
    config: TrainerConfig,
    *,
    teacher_dir: str,
    data: Sequence[str] | str,
    student_dir: str | None = None,
    preset_name: str | None = None,
    mode: str = "logits",
    loss: DistillConfig | None = None,
    data_format: str = "auto",
    template: str | None = None,
    seq_len: int = 256,
    val_fraction: float = 0.05,
    truncation: str = "right",
    max_new_tokens: int = 128,
    do_sample: bool = False,
    gen_temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    gen_batch_size: int = 16,
    teacher_dtype: str = "fp32",
    resume: bool = False,
    overwrite: bool = False,
    on_bad_file: str = "error",
) -> RecipeOutput:
    """Distil the checkpoint in ``teacher_dir`` into the one in ``student_dir`` or a new
    ``preset_name`` model built on the teacher's vocabulary (exactly one of the two).

    ``mode="logits"``: the loss ``loss`` (:class:`DistillConfig`) on ``data``: text files/folders/jsonl
    packed into rows of ``seq_len`` tokens (every next token is a target), or a prompt/completion
    jsonl (completion tokens are targets; ``template``, ``truncation`` as ``fastlm finetune``);
    ``data_format`` "auto" takes one .jsonl file whose rows have "prompt"/"messages" as the latter.
    ``mode="sequence"``: the teacher completes the prompts of the jsonl ``data``
    (:func:`teacher_completions`), the student is fine-tuned on them (``loss`` is not used).
    The data is tokenized with the teacher's tokenizer, which the student's checkpoints carry.
    ``resume``/``overwrite``/``val_fraction``/``on_bad_file`` as in :func:`fastlm.train.pretrain`.
    """
    loss = loss if loss is not None else DistillConfig()
    data = [data] if isinstance(data, (str, Path)) else [str(p) for p in data]
    # every argument is checked before any work
    if mode not in MODES:
        raise ValueError(f"{shown('mode')} must be one of {' | '.join(MODES)}, got {mode!r}")
    if data_format not in DATA_FORMATS:
        raise ValueError(f"{shown('data_format')} must be one of {' | '.join(DATA_FORMATS)}, got {data_format!r}")
    if (student_dir is None) == (preset_name is None):
        raise ValueError(f"give exactly one of {shown('student_dir')} (a checkpoint) and {shown('preset_name')} "
                         "(a new model on the teacher's vocabulary)")
    if preset_name is not None and preset_name not in PRESETS:
        raise ValueError(f"unknown {shown('preset_name')} {preset_name!r}; available: {', '.join(sorted(PRESETS))}")
    if teacher_dtype not in _DTYPES:
        raise ValueError(f"{shown('teacher_dtype')} must be one of {' | '.join(_DTYPES)}, got {teacher_dtype!r}")
    if truncation not in TRUNCATION_SIDES:
        raise ValueError(f"{shown('truncation')} must be one of {TRUNCATION_SIDES}, got {truncation!r}")
    for name, value, low in (("seq_len", seq_len, 1), ("max_new_tokens", max_new_tokens, 1),
                             ("gen_batch_size", gen_batch_size, 1)):
        _check_int(name, value, low)
    if not 0 < val_fraction < 1:
        raise ValueError(f"{shown('val_fraction')} must be in (0, 1), got {val_fraction!r}")
    if not gen_temperature > 0:
        raise ValueError(f"{shown('gen_temperature')} must be > 0, got {gen_temperature}")
    if top_k is not None:
        _check_int("top_k", top_k, 1)
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"{shown('top_p')} must be in (0, 1], got {top_p}")
    check_model_dir(teacher_dir, shown("teacher_dir"))
    if student_dir is not None:
        check_model_dir(student_dir, shown("student_dir"))
    for path in data:
        if not Path(path).exists():
            raise FileNotFoundError(f"{shown('data')} {path}: no such file or directory")
    pairs = data_format == "prompt-completion" or (data_format == "auto" and _looks_like_prompt_completion(data))
    if mode == "sequence" and data_format == "text":
        raise ValueError(f"{shown('data_format')} text: --mode sequence takes one jsonl file of prompts")
    if mode == "logits" and not pairs and (template is not None or truncation != "right"):
        raise ValueError(f"{shown('template')} and {shown('truncation')} apply to prompt/completion data; "
                         f"{shown('data')} is read as text (see {shown('data_format')})")
    if (mode == "sequence" or pairs) and (len(data) != 1 or not Path(data[0]).is_file()):
        raise ValueError(f"{shown('data')} must be one jsonl file of prompts for "
                         f"{'--mode sequence' if mode == 'sequence' else 'prompt/completion data'}, got {data}")
    prompts = read_prompts(data[0]) if mode == "sequence" else None
    student_context = (load_config(student_dir) if student_dir else preset(preset_name)).max_position_embeddings
    if seq_len > student_context:
        raise ValueError(f"{shown('seq_len')} {seq_len} exceeds the student's context of {student_context}")
    if seq_len > load_config(teacher_dir).max_position_embeddings:
        raise ValueError(f"{shown('seq_len')} {seq_len} exceeds the teacher's context of "
                         f"{load_config(teacher_dir).max_position_embeddings}")

    tokenizer = load_tokenizer(teacher_dir)
    gen_template = resolve_template(tokenizer, template, tuple(TEMPLATES)) if mode == "sequence" else None
    teacher = from_pretrained(teacher_dir, dtype=_DTYPES[teacher_dtype])
    if student_dir is not None:
        student = from_pretrained(student_dir, dtype=torch.float32)
        try:
            student_tokenizer = load_tokenizer(student_dir)
        except FileNotFoundError:
            student_tokenizer = None
            logger.warning("%s %s has no tokenizer: compared the vocabulary size and special ids of the configs "
                           "only; its checkpoints get the teacher's tokenizer", shown("student_dir"), student_dir)
        check_compatible(teacher, student, tokenizer, student_tokenizer)
    else:
        torch.manual_seed(config.seed)  # the same initial student in every process and every run
        student = Model(preset(preset_name, vocab_size=teacher.config.vocab_size, bos_token_id=tokenizer.bos_token_id,
                               eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id))
        check_compatible(teacher, student)
    logger.info("distilling a %.2f M-parameter teacher into a %.2f M-parameter student (%s)",
                teacher.num_parameters() / 1e6, student.num_parameters() / 1e6, mode)
    settings = dict(command="distill", mode=mode, teacher=str(Path(teacher_dir).resolve()),
                    student=str(Path(student_dir).resolve()) if student_dir else None, preset=preset_name,
                    teacher_dtype=teacher_dtype, data_format="prompt-completion" if pairs or mode == "sequence"
                    else "text")
    if mode == "logits":
        settings.update(dataclasses.asdict(loss))
    else:
        settings.update(max_new_tokens=max_new_tokens, do_sample=do_sample, gen_temperature=gen_temperature,
                        top_k=top_k, top_p=top_p)
    info = distributed.setup(config.device)
    if resume:
        _check_resume_settings(Path(config.out), settings)

    if mode == "sequence":
        out = rundir.prepare_out(config.out, resume=resume, overwrite=overwrite, is_main=info.is_main)
        completions = out / COMPLETIONS_FILE
        if completions.is_file():
            logger.info("resuming: using the teacher's completions in %s", completions)
        elif info.is_main:
            rows = teacher_completions(teacher.to(info.device), tokenizer, prompts, template=gen_template,
                                       max_new_tokens=max_new_tokens, do_sample=do_sample,
                                       temperature=gen_temperature, top_k=top_k, top_p=top_p,
                                       batch_size=gen_batch_size, seed=config.seed)
            atomic_write_text(completions, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
            logger.info("the teacher completed %d prompts: %s", len(rows), completions)
        distributed.barrier()
        del teacher
        # out is prepared and holds the completions: the fine-tuning path continues this run
        prepared = prepare_finetune(config, data=str(completions), model_dir=teacher_dir, template=template,
                                    seq_len=seq_len, val_data=None, val_fraction=val_fraction, resume=True,
                                    overwrite=False, truncation=truncation, settings=settings)
        trainer = Trainer(student, prepared.train, config, val_source=prepared.val, extra_files=prepared.extra_files)
        return RecipeOutput(student, tokenizer, trainer.fit(resume=resume))

    if pairs:
        prepared = prepare_finetune(config, data=data[0], model_dir=teacher_dir, template=template, seq_len=seq_len,
                                    val_data=None, val_fraction=val_fraction, resume=resume, overwrite=overwrite,
                                    truncation=truncation, settings=settings)
        train, val, extra_files = prepared.train, prepared.val, prepared.extra_files
    else:
        if tokenizer.eos_token_id is None:
            raise ValueError("the teacher's tokenizer has no end-of-sequence token to separate documents")
        texts = read_texts(data, on_bad_file=on_bad_file)
        out = rundir.prepare_out(config.out, resume=resume, overwrite=overwrite, is_main=info.is_main)
        distributed.barrier()
        train_texts, val_texts = split_train_val(texts, val_fraction=val_fraction, seed=config.seed)
        settings.update(data=data, data_fingerprint=rundir.texts_fingerprint(texts), seq_len=seq_len,
                        val_fraction=val_fraction, **_trainer_settings(config))
        rundir.begin_run(out, settings, resume=resume, is_main=info.is_main)
        common = dict(seq_len=seq_len, separator=tokenizer.eos_token_id, batch_size=config.batch_size)
        train = PackedSource(tokenize_stream(train_texts, tokenizer), seed=config.seed, **common)
        val = PackedSource(tokenize_stream(val_texts, tokenizer), seed=config.seed + 1, **common)
        extra_files = tokenizer.save
    trainer = DistillTrainer(student, teacher, train, config, loss, val_source=val, extra_files=extra_files)
    return RecipeOutput(student, tokenizer, trainer.fit(resume=resume))
