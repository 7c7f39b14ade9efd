"""Reward models: a fastlm model with a scalar head on the last non-padding token.

``RewardModel(backbone)`` maps token ids (B, T) to rewards (B,)::

    hidden = backbone(input_ids, return_hidden=True)          # (B, T, H), final norm applied
    last[b] = index of the last non-padding token of row b    # see RewardModel.forward
    logits = hidden[b, last[b]] @ score.weightᵀ                # (B, num_labels)
    reward = logits[:, 0]          (num_labels = 1, a scalar head)
           = logits[:, positive]   (num_labels = 2, a two-class classifier: the positive-class logit)

Trained on preference pairs with the Bradley–Terry loss −log σ(r_chosen − r_rejected − margin)
(:func:`pairwise_loss`), fully, with LoRA adapters on the backbone (fastlm.peft) or with the
backbone frozen (only the head learns); see :mod:`fastlm.align.reward_train`.

Files: :meth:`RewardModel.save_pretrained` writes a Hugging Face ``<Family>ForSequenceClassification``
directory (``config.json`` with ``architectures``, ``id2label``, ``pad_token_id``; safetensors with
the backbone's ``model.*`` tensors and ``score.weight``, no ``lm_head``) that
``transformers.AutoModelForSequenceClassification`` loads with the same scores;
:func:`load_reward_model` reads those files back, including ones written by transformers or TRL.
transformers picks the scored token as the last token that is not ``pad_token_id``; so does this
model when no attention mask is given.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file as safe_load_file
from safetensors.torch import save_file
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

from fastlm._files import atomic_write_text
from fastlm._naming import shown
from fastlm.align.data import check_pair_batch, collate_pairs, prepare_pairs
from fastlm.io import atomic_write, from_pretrained
from fastlm.io.checkpoint import read_hf_config, read_safetensors
from fastlm.io.families import HF_NAME_BY_ARCH, config_from_hf, config_to_hf
from fastlm.io.hf_format import CheckpointError, state_dict_from_hf, state_dict_to_hf
from fastlm.model import Model
from fastlm.peft import LoraConfig, LoraModel
from fastlm.train.trainer import Trainer, TrainerConfig, TrainResult

logger = logging.getLogger(__name__)

__all__ = ["REWARD_INFO_FILE", "REWARD_METHODS", "RewardModel", "RewardOutput", "RewardTrainer", "load_reward_model",
           "pairwise_accuracy", "pairwise_loss", "sequence_classification_name", "train_reward_model"]

#: Written next to the weights: the prompt template the reward model scores texts with.
REWARD_INFO_FILE = "reward_model.json"
_SEQ_CLS = "ForSequenceClassification"


def sequence_classification_name(arch: str) -> str:
    """transformers' sequence-classification class of a fastlm family: ``"llama"`` ->
    ``"LlamaForSequenceClassification"``, ``"gpt2"`` -> ``"GPT2ForSequenceClassification"``."""
    if arch not in HF_NAME_BY_ARCH:
        raise ValueError(f"unknown family {arch!r}; supported: {', '.join(HF_NAME_BY_ARCH)}")
    causal = HF_NAME_BY_ARCH[arch]
    return "GPT2" + _SEQ_CLS if arch == "gpt2" else causal.removesuffix("ForCausalLM") + _SEQ_CLS


_ARCH_BY_SEQ_CLS = {sequence_classification_name(a): a for a in HF_NAME_BY_ARCH}


def pairwise_loss(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor,
                  margin: torch.Tensor | float | None = None) -> torch.Tensor:
    """Per-pair Bradley–Terry loss −log σ(r_c − r_r − margin) (TRL's RewardTrainer with a
    ``margin`` column), (B,) float32."""
    diff = chosen_rewards.float() - rejected_rewards.float()
    if margin is not None:
        diff = diff - margin
    return -F.logsigmoid(diff)


def _base_model(backbone: nn.Module) -> Model:
    base = backbone.model if isinstance(backbone, LoraModel) else backbone
    if not isinstance(base, Model):
        raise TypeError(f"RewardModel wraps a fastlm Model or a LoraModel over one, got {type(backbone).__name__}")
    return base


class RewardModel(nn.Module):
    """A fastlm model (or a LoraModel over one) with a linear head ``head`` (num_labels, H), no
    bias (``score.weight`` in the files), read at the last non-padding token. See the module docstring for the math.

    ``num_labels`` 1 (a scalar reward) or 2 (a classifier whose ``positive_label`` logit is the
    reward). ``pad_token_id`` (default: the backbone config's) marks padding when no attention
    mask is given. ``template`` is the prompt template :meth:`score` formats texts with (as the
    training data was; see :mod:`fastlm.align.data`).
    """

    def __init__(self, backbone: nn.Module, *, num_labels: int = 1, positive_label: int = 1,
                 pad_token_id: int | None = None, template: str = "plain", head: nn.Linear | None = None) -> None:
        super().__init__()
        base = _base_model(backbone)
        if num_labels not in (1, 2):
            raise ValueError(f"num_labels must be 1 (scalar reward) or 2 (two-class classifier), got {num_labels!r}")
        if num_labels == 2 and positive_label not in (0, 1):
            raise ValueError(f"positive_label must be 0 or 1 for a two-class head, got {positive_label!r}")
        self.backbone = backbone
        if type(base.lm_head) is nn.Linear and base.lm_head.weight is not base.embed.weight:
            base.lm_head.requires_grad_(False)  # the LM head is unused by a reward model
        self.num_labels = num_labels
        self.positive_label = positive_label if num_labels == 2 else 0
        self.pad_token_id = base.config.pad_token_id if pad_token_id is None else pad_token_id
        self.template = template
        if head is None:
            head = nn.Linear(base.config.hidden_size, num_labels, bias=False, device=base.device, dtype=base.dtype)
            nn.init.normal_(head.weight, std=base.config.initializer_range)  # transformers' _init_weights
        if head.weight.shape != (num_labels, base.config.hidden_size) or head.bias is not None:
            raise ValueError(f"head must be a bias-free Linear of weight shape ({num_labels}, "
                             f"{base.config.hidden_size}), got {tuple(head.weight.shape)}")
        self.head = head  # saved as transformers' "score.weight"; rm.score(...) scores texts

    # ---- what the Trainer and generate-side code use ------------------------------------------

    @property
    def config(self):
        return _base_model(self.backbone).config

    @property
    def base_model(self) -> Model:
        return _base_model(self.backbone)

    @property
    def device(self) -> torch.device:
        return self.head.weight.device

    @property
    def lm_head(self) -> nn.Module:  # the Trainer inspects it to choose its loss path; unused here
        return self.base_model.lm_head

    @property
    def gradient_checkpointing(self) -> bool:
        return self.base_model.gradient_checkpointing

    @gradient_checkpointing.setter
    def gradient_checkpointing(self, value: bool) -> None:
        self.base_model.gradient_checkpointing = value

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    # ---- forward ------------------------------------------------------------------------------

    def last_token_index(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        """(B,) position of the token the head reads: with ``attention_mask`` (right padding) its
        row sum − 1; without, transformers' rule: the last token that is not ``pad_token_id``
        (the last token when there is no pad id)."""
        t = input_ids.shape[1]
        if attention_mask is not None:
            return attention_mask.sum(-1) - 1
        if self.pad_token_id is None:
            return torch.full((input_ids.shape[0],), t - 1, dtype=torch.int64, device=input_ids.device)
        positions = torch.arange(t, device=input_ids.device)
        return (positions * (input_ids != self.pad_token_id)).argmax(-1)

    def _check(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> None:
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
            raise ValueError(f"RewardModel: expected input_ids of shape (B, T), got "
                             f"{tuple(input_ids.shape) if isinstance(input_ids, torch.Tensor) else type(input_ids)}")
        if attention_mask is None:
            return
        if attention_mask.shape != input_ids.shape:
            raise ValueError(f"RewardModel: attention_mask shape {tuple(attention_mask.shape)} != input_ids shape "
                             f"{tuple(input_ids.shape)}")
        lens = attention_mask.sum(-1)
        right = torch.arange(input_ids.shape[1], device=lens.device) < lens[:, None]
        if not torch.equal(attention_mask.bool(), right):
            raise ValueError("RewardModel: attention_mask must mark right padding (ones, then zeros in each row)")
        if bool((lens == 0).any()):
            raise ValueError("RewardModel: a row of attention_mask is all zeros (no token to score)")

    def logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, *,
               validate: bool = True) -> torch.Tensor:
        """(B, num_labels) head outputs at the last non-padding token, float32. ``validate=False``
        skips the host-synchronizing mask checks (for batches checked at the data boundary)."""
        if validate:
            self._check(input_ids, attention_mask)
        key_lens = None if attention_mask is None else attention_mask.sum(-1)
        hidden = self.backbone(input_ids, return_hidden=True, key_lens=key_lens, validate=validate)  # (B, T, H)
        last = self.last_token_index(input_ids, attention_mask)  # (B,)
        picked = hidden[torch.arange(hidden.shape[0], device=hidden.device), last]  # (B, H)
        return self.head(picked.to(self.head.weight.dtype)).float()

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, *,
                validate: bool = True) -> torch.Tensor:
        """Rewards (B,) float32 of the token rows ``input_ids`` (B, T); ``attention_mask`` (B, T)
        marks right padding (without it, tokens equal to ``pad_token_id`` are padding)."""
        return self.logits(input_ids, attention_mask, validate=validate)[:, self.positive_label]

    def score(self, prompts: Sequence, completions: Sequence, tokenizer, *, batch_size: int = 16,
              max_len: int | None = None) -> list[float]:
        """Rewards of ``completions[i]`` after ``prompts[i]`` (strings, or chat message lists),
        encoded as the training pairs are (:func:`fastlm.align.data.encode_completion` with the
        model's template, end-of-sequence token included), in batches of ``batch_size``."""
        return _score_texts(self, prompts, completions, tokenizer, batch_size=batch_size, max_len=max_len)

    # ---- files --------------------------------------------------------------------------------

    def _backbone_state(self) -> dict[str, torch.Tensor]:
        """The backbone's fastlm state dict with any LoRA adapter merged (the model is unchanged)."""
        if isinstance(self.backbone, LoraModel) and self.backbone.active_adapter is not None \
                and not self.backbone.adapters_disabled:
            lora = self.backbone
            lora.merge_adapter()
            try:
                state = {n.replace(".base.", "."): t.detach().clone() for n, t in lora.model.state_dict().items()
                         if ".lora_" not in n}
            finally:
                lora.unmerge_adapter()
            return state
        return {n.replace(".base.", "."): t.detach() for n, t in self.base_model.state_dict().items()
                if ".lora_" not in n}

    def save_pretrained(self, directory: str | Path, *, tokenizer=None) -> None:
        """Write a ``<Family>ForSequenceClassification`` checkpoint (LoRA merged) that transformers
        loads with the same scores; the tokenizer too when given. See the module docstring."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        config = self.config
        state = self._backbone_state()
        if "lm_head.weight" not in state:  # a head dropped by load_reward_model: a placeholder, left out below
            state["lm_head.weight"] = state["embed.weight"]
        tensors = {n: t.detach().cpu().contiguous() for n, t in state_dict_to_hf(config, state).items()}
        tensors.pop("lm_head.weight", None)
        tensors["score.weight"] = self.head.weight.detach().cpu().contiguous()
        atomic_write(directory / "model.safetensors", lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))
        hf = config_to_hf(config, self.head.weight.dtype)
        hf["architectures"] = [sequence_classification_name(config.arch)]
        labels = ["LABEL_0"] if self.num_labels == 1 else ["LABEL_0", "LABEL_1"]
        hf["id2label"] = {str(i): name for i, name in enumerate(labels)}
        hf["label2id"] = {name: i for i, name in enumerate(labels)}
        hf["num_labels"] = self.num_labels
        hf["pad_token_id"] = self.pad_token_id
        atomic_write_text(directory / REWARD_INFO_FILE, json.dumps(
            {"positive_label": self.positive_label, "template": self.template}) + "\n")
        if tokenizer is not None:
            tokenizer.save(directory)
        atomic_write_text(directory / "config.json", json.dumps(hf, indent=2))  # last: the directory is complete

    @classmethod
    def from_pretrained(cls, directory: str | Path, *, num_labels: int = 1, dtype: torch.dtype | None = None,
                        device=None, **options) -> RewardModel:
        """A reward model from ``directory``: a ``…ForSequenceClassification`` checkpoint (as
        :func:`load_reward_model`), or a causal-LM checkpoint whose backbone gets a new head of
        ``num_labels`` outputs (normal(0, initializer_range), as transformers initialises it)."""
        hf = read_hf_config(directory)
        if any(str(a).endswith(_SEQ_CLS) for a in hf.get("architectures") or []):
            return load_reward_model(directory, dtype=dtype, device=device)
        model = from_pretrained(directory, dtype=dtype, device=device)
        return cls(model, num_labels=num_labels, **options)


def _score_texts(self: RewardModel, prompts: Sequence, completions: Sequence, tokenizer, *, batch_size: int = 16,
                 max_len: int | None = None) -> list[float]:
    from fastlm.align.data import encode_completion

    if len(prompts) != len(completions):
        raise ValueError(f"score: {len(prompts)} prompts but {len(completions)} completions")
    max_len = self.config.max_position_embeddings if max_len is None else max_len
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    rows = [encode_completion(tokenizer, p, c, self.template, max_len)[0] for p, c in zip(prompts, completions)]
    was_training = self.training
    self.eval()
    out: list[float] = []
    try:
        with torch.no_grad():
            for start in range(0, len(rows), batch_size):
                chunk = rows[start:start + batch_size]
                width = max(len(r) for r in chunk)
                ids = torch.full((len(chunk), width), pad, dtype=torch.int64)
                mask = torch.zeros((len(chunk), width), dtype=torch.int64)
                for i, r in enumerate(chunk):
                    ids[i, :len(r)] = torch.tensor(r)
                    mask[i, :len(r)] = 1
                out += self(ids.to(self.device), mask.to(self.device)).tolist()
    finally:
        self.train(was_training)
    return out


def load_reward_model(directory: str | Path, *, dtype: torch.dtype | None = None, device=None) -> RewardModel:
    """Load a ``<Family>ForSequenceClassification`` checkpoint (written by
    :meth:`RewardModel.save_pretrained`, transformers or TRL): backbone tensors, ``score.weight``
    (num_labels 1 or 2, from ``id2label``/``num_labels``; transformers' default is 2),
    ``pad_token_id``. Raises CheckpointError for a causal-LM or unknown directory."""
    directory = Path(directory)
    hf = read_hf_config(directory)
    names = [str(a) for a in hf.get("architectures") or []]
    arch = next((_ARCH_BY_SEQ_CLS[a] for a in names if a in _ARCH_BY_SEQ_CLS), None)
    if arch is None:
        raise CheckpointError(f"{directory}/config.json: architectures {names} is not a sequence-classification "
                              f"model of a supported family ({', '.join(_ARCH_BY_SEQ_CLS)}); a causal-LM checkpoint "
                              "starts a new reward model with RewardModel.from_pretrained")
    causal = dict(hf, architectures=[HF_NAME_BY_ARCH[arch]])
    config = config_from_hf(causal)
    tensors = read_safetensors(directory)
    if "score.weight" not in tensors:
        raise CheckpointError(f"{directory}: no 'score.weight' tensor (the reward head)")
    score = tensors.pop("score.weight")
    if "score.bias" in tensors:
        raise CheckpointError(f"{directory}: 'score.bias' found; reward heads have no bias (transformers' "
                              "…ForSequenceClassification uses bias=False)")
    id2label = hf.get("id2label")
    num_labels = len(id2label) if isinstance(id2label, dict) and id2label else int(hf.get("num_labels", 2))
    if score.dim() != 2 or score.shape != (num_labels, config.hidden_size):
        raise CheckpointError(f"{directory}: score.weight has shape {tuple(score.shape)}, expected ({num_labels}, "
                              f"{config.hidden_size}) from config.json")
    if num_labels not in (1, 2):
        raise CheckpointError(f"{directory}: {num_labels} labels; a reward model has 1 (scalar) or 2 (classifier)")
    config = config.replace(tie_word_embeddings=True)  # no lm_head is stored: tie it to the embedding, unused
    tensors.pop("lm_head.weight", None)
    state = state_dict_from_hf(config, tensors)
    if dtype is None:
        stored = str(hf.get("torch_dtype") or hf.get("dtype") or "").removeprefix("torch.")
        dtype = getattr(torch, stored, None) if stored else None
        dtype = dtype if isinstance(dtype, torch.dtype) and dtype.is_floating_point else score.dtype
    device = torch.device("cpu") if device is None else torch.device(device)
    with torch.device("meta"):
        model = Model(config)
    expected = model.state_dict()
    for name, tensor in state.items():
        if tensor.shape != expected[name].shape:
            raise CheckpointError(f"{directory}: tensor for {name!r} has shape {tuple(tensor.shape)}, expected "
                                  f"{tuple(expected[name].shape)} from config.json")
    converted: dict[int, torch.Tensor] = {}
    state = {n: converted.setdefault(id(t), t.to(device=device, dtype=dtype).contiguous()) for n, t in state.items()}
    model.load_state_dict(state, strict=True, assign=True)
    model.lm_head.weight = model.embed.weight
    info_path = directory / REWARD_INFO_FILE
    info = json.loads(info_path.read_text()) if info_path.is_file() else {}
    head = nn.Linear(config.hidden_size, num_labels, bias=False, device=device, dtype=dtype)
    with torch.no_grad():
        head.weight.copy_(score)
    rm = RewardModel(model, num_labels=num_labels, positive_label=int(info.get("positive_label", 1)),
                     pad_token_id=hf.get("pad_token_id"), template=info.get("template", "plain"), head=head)
    return rm.eval()


# ---- training ----------------------------------------------------------------------------------

#: How a reward model trains: every weight, LoRA adapters on the backbone (+ the head), or the head alone.
REWARD_METHODS = ("full", "lora", "frozen")
_TRAINABLE_FILE = "trainable.safetensors"  # LoRA/frozen checkpoints: the trained tensors, for an exact resume


class RewardTrainer(Trainer):
    """Trains a :class:`RewardModel` on :class:`~fastlm.align.data.PairSource` batches with the
    pairwise loss, mean over pairs. Logs ``rewards/accuracies`` (fraction of pairs with
    r_chosen > r_rejected) and ``rewards/margins`` (mean r_chosen − r_rejected) per step.
    Checkpoints are ``…ForSequenceClassification`` directories (LoRA merged) that
    :func:`load_reward_model` and transformers load; with LoRA or a frozen backbone they also
    hold the trained tensors (``trainable.safetensors``) to resume from."""

    progress_metrics = ("rewards/accuracies",)

    def __init__(self, model: RewardModel, train_source, config: TrainerConfig, **kwargs) -> None:
        if not isinstance(model, RewardModel):
            raise TypeError(f"RewardTrainer trains a RewardModel, got {type(model).__name__}")
        if config.fsdp:
            raise ValueError("RewardTrainer: fsdp is not supported (checkpoints are written from the main process's "
                             "whole model); train with DDP")
        super().__init__(model, train_source, config, **kwargs)
        self._stats: torch.Tensor | None = None

    def _check_batch(self, batch: dict, what: str) -> int:
        return check_pair_batch(batch, self.model.config.vocab_size, what)

    def _loss_sum(self, batch: dict, num_targets: int) -> torch.Tensor:
        with self._autocast():
            rewards = self.forward(batch["input_ids"], batch["attention_mask"], validate=False)  # (2b,)
        chosen, rejected = rewards.float().chunk(2)
        losses = pairwise_loss(chosen, rejected, batch["margin"])
        if self.model.training:
            stats = torch.stack(((chosen > rejected).float().sum(), (chosen - rejected).sum(),
                                 torch.tensor(float(chosen.shape[0]), device=chosen.device))).detach()
            self._stats = stats if self._stats is None else self._stats + stats
        return losses.sum()

    def _step_metrics(self) -> dict[str, float]:
        if self._stats is None:
            return {}
        correct, margin, count = self._stats.tolist()  # the step's second (small) device→host read
        self._stats = None
        return {"rewards/accuracies": correct / count, "rewards/margins": margin / count}

    def _gather_model(self) -> None:
        return None  # written from the main process's own (unsharded) model

    def _trainable(self) -> dict[str, torch.Tensor]:
        return {n: p.detach().cpu().contiguous() for n, p in self.model.named_parameters() if p.requires_grad}

    def _write_model(self, directory: Path, gathered) -> None:
        self.model.save_pretrained(directory)
        if not _all_trainable(self.model):
            tensors = self._trainable()
            atomic_write(directory / _TRAINABLE_FILE, lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))

    def _load_model(self, directory: Path, optimizer_state: dict) -> None:
        if (directory / _TRAINABLE_FILE).is_file():
            loaded = dict(safe_load_file(str(directory / _TRAINABLE_FILE)))
        else:  # full training: every weight is in the exported checkpoint
            saved = load_reward_model(directory, dtype=self.model.head.weight.dtype).state_dict()
            loaded = {n: saved[n] for n, p in self.model.named_parameters() if p.requires_grad}
        expected = {n for n, p in self.model.named_parameters() if p.requires_grad}
        if set(loaded) != expected:
            raise CheckpointError(f"{directory}: the checkpoint's trained tensors do not match this run's "
                                  f"(missing {sorted(expected - set(loaded))[:3]}, extra {sorted(set(loaded) - expected)[:3]})")
        params = dict(self.model.named_parameters())
        with torch.no_grad():
            for name, tensor in loaded.items():
                params[name].copy_(tensor)
        options = StateDictOptions(full_state_dict=True, strict=True)
        set_optimizer_state_dict(self.wrapped, self.optimizer, optimizer_state, options=options)


def _all_trainable(model: nn.Module) -> bool:
    return all(p.requires_grad for n, p in model.named_parameters() if not n.endswith("lm_head.weight"))


@torch.no_grad()
def pairwise_accuracy(rm: RewardModel, examples, *, pad_id: int, batch_size: int = 32) -> float:
    """Fraction of :class:`~fastlm.align.data.PairExample` pairs the model orders correctly
    (r_chosen > r_rejected; a tie counts as wrong)."""
    if not examples:
        raise ValueError("pairwise_accuracy: no pairs")
    was_training = rm.training
    rm.eval()
    correct = 0
    try:
        for start in range(0, len(examples), batch_size):
            batch = collate_pairs(examples[start:start + batch_size], pad_id)
            rewards = rm(batch["input_ids"].to(rm.device), batch["attention_mask"].to(rm.device))
            chosen, rejected = rewards.chunk(2)
            correct += int((chosen > rejected).sum())
    finally:
        rm.train(was_training)
    return correct / len(examples)


@dataclass
class RewardOutput:
    model: RewardModel
    tokenizer: object
    result: TrainResult
    accuracy: float | None  # held-out pairwise accuracy after training (None without held-out pairs)
    accuracy_before: float | None


def train_reward_model(config: TrainerConfig, *, data: str, model_dir: str, method: str = "full",
                       lora: LoraConfig | None = None, num_labels: int = 1, template: str | None = None,
                       seq_len: int = 512, val_data: str | None = None, val_fraction: float = 0.1,
                       on_bad_row: str = "error", resume: bool = False, overwrite: bool = False) -> RewardOutput:
    """Train a reward model from the checkpoint in ``model_dir`` (a causal LM: a new head; or a
    ``…ForSequenceClassification``: continue) on preference rows (rankings or pairs, see
    :mod:`fastlm.align.data`), ``method`` full / lora / frozen. Held-out pairs: ``val_data``,
    else ``val_fraction`` of the rows. Checkpoints in ``<out>/checkpoints/step-*`` are reward-model
    directories with the tokenizer; the held-out pairwise accuracy before and after is written to
    ``<out>/reward_eval.json``."""
    if method not in REWARD_METHODS:
        raise ValueError(f"{shown('method')} must be one of {REWARD_METHODS}, got {method!r}")
    prepared = prepare_pairs(config, data=data, model_dir=model_dir, template=template, seq_len=seq_len,
                             val_data=val_data, val_fraction=val_fraction, on_bad_row=on_bad_row, resume=resume,
                             overwrite=overwrite, settings=dict(command="reward", method=method, num_labels=num_labels,
                                                                lora=dataclasses.asdict(lora) if lora else None))
    torch.manual_seed(config.seed)  # the same head (and adapter) initialisation in every process and run
    rm = RewardModel.from_pretrained(model_dir, num_labels=num_labels, dtype=torch.float32,
                                     template=prepared.template)
    rm.template = prepared.template
    if method == "frozen":
        rm.backbone.requires_grad_(False)
    elif method == "lora":
        rm = RewardModel(LoraModel(rm.base_model, lora or LoraConfig()), num_labels=rm.num_labels,
                         positive_label=rm.positive_label, pad_token_id=rm.pad_token_id, template=rm.template,
                         head=rm.head)
    val = prepared.val.examples if prepared.val is not None else None
    pad = prepared.train.pad_id
    before = pairwise_accuracy(rm, val, pad_id=pad) if val else None

    def extra_files(directory: Path) -> None:
        prepared.tokenizer.save(directory)

    trainer = RewardTrainer(rm, prepared.train, config, val_source=prepared.val, extra_files=extra_files)
    result = trainer.fit(resume=resume)
    after = pairwise_accuracy(rm, val, pad_id=pad) if val else None
    if trainer.info.is_main:
        atomic_write_text(prepared.out / "reward_eval.json", json.dumps(
            {"held_out_pairs": len(val or []), "accuracy_before": before, "accuracy": after,
             "bad_rows": len(prepared.report.bad), "pairs": prepared.report.pairs}, indent=2) + "\n")
    return RewardOutput(rm, prepared.tokenizer, result, after, before)
