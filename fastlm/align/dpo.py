"""Offline preference optimization: DPO (sigmoid), IPO and SimPO on (chosen, rejected) pairs.

Losses, per pair, with policy log-probs π_c, π_r and reference log-probs ρ_c, ρ_r of the
chosen/rejected completions (sums over completion tokens; per-token means for IPO and SimPO):

    h = (π_c − π_r) − (ρ_c − ρ_r)
    sigmoid (DPO):  −(1 − ε)·log σ(β·h) − ε·log σ(−β·h)      (ε = label_smoothing: conservative DPO)
    ipo:            (h − 1/(2β))²                               (h from per-token means)
    simpo:          −(1 − ε)·log σ(β·(π̄_c − π̄_r) − γ) − ε·log σ(−(β·(π̄_c − π̄_r) − γ))   (no reference)
    rewards:        β·(π_c − ρ_c), β·(π_r − ρ_r)   (SimPO: β·π̄_c, β·π̄_r), detached

as TRL defines them (DPOTrainer's ``sigmoid``/``ipo`` — TRL 1.x normalises IPO's log-ratios by
the completion length, which equals feeding per-token means here; its ``sigmoid`` has no label
smoothing, equal to ε = 0 — and CPOTrainer's ``simpo``).

:class:`DPOTrainer` runs them on fastlm's training engine. The reference is the model before
training: its log-probs are computed once, in a pass over the data before the first step, and
cached (``reference="precompute"``); or, for a LoRA model, by the same model with its adapters
disabled at each step (``reference="adapters_off"``: no second copy of the weights, as TRL does
with PEFT). The policy's loss goes through :func:`fastlm.ops.linear_preference_loss` (the head,
the sequence log-probs, the loss and its gradients in one pass chunked by pairs: no (B, T, V)
logits, no recomputation in backward; a final logit soft-cap applied); a head that op cannot take
(LoRA on lm_head) goes through :func:`fastlm.align.logprobs.sequence_logprobs` and the loss functions
below. Per step, metrics.jsonl gets ``rewards/chosen``, ``rewards/rejected``,
``rewards/accuracies`` and ``rewards/margins`` as TRL logs them.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from fastlm import ops
from fastlm._naming import shown
from fastlm.align.data import check_pair_batch, collate_pairs, prepare_pairs
from fastlm.align.logprobs import IGNORE, preference_rows, sequence_logprobs
from fastlm.io import from_pretrained
from fastlm.model import Model
from fastlm.peft import LoraConfig, LoraModel
from fastlm.peft.tuning import AdapterTrainer
from fastlm.train.trainer import Trainer, TrainerConfig, TrainResult

logger = logging.getLogger(__name__)

__all__ = ["DPO_LOSSES", "REFERENCES", "DPOConfig", "DPOOutput", "DPOTrainer", "dpo_loss", "simpo_loss", "train_dpo"]

DPO_LOSSES = ("sigmoid", "ipo", "simpo")
#: Where reference log-probs come from: cached from a pass before training, the LoRA model with
#: adapters off at each step, or none (SimPO).
REFERENCES = ("precompute", "adapters_off", "none")


def _check_beta(beta: float) -> None:
    if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not beta > 0:
        raise ValueError(f"{shown('beta')} must be a number > 0, got {beta!r}")


def _check_smoothing(label_smoothing: float) -> None:
    if not isinstance(label_smoothing, (int, float)) or not 0 <= label_smoothing < 0.5:
        raise ValueError(f"{shown('label_smoothing')} must be in [0, 0.5), got {label_smoothing!r}")


def dpo_loss(policy_chosen_logps: torch.Tensor, policy_rejected_logps: torch.Tensor,
             ref_chosen_logps: torch.Tensor, ref_rejected_logps: torch.Tensor, *, beta: float = 0.1,
             loss_type: str = "sigmoid", label_smoothing: float = 0.0
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair DPO (``"sigmoid"``) or IPO (``"ipo"``) losses (B,) and the implicit rewards
    β·(π − ρ) of the chosen and rejected completions (B,), detached. All inputs (B,): summed
    completion log-probs for DPO, per-token means for IPO. See the module docstring."""
    _check_beta(beta)
    _check_smoothing(label_smoothing)
    if loss_type not in ("sigmoid", "ipo"):
        raise ValueError(f"{shown('loss_type')} must be 'sigmoid' or 'ipo' for dpo_loss (simpo_loss is "
                         f"reference-free), got {loss_type!r}")
    if loss_type == "ipo" and label_smoothing:
        raise ValueError(f"{shown('label_smoothing')} applies to the sigmoid loss only (IPO has none)")
    chosen_ratio = policy_chosen_logps - ref_chosen_logps  # (B,)
    rejected_ratio = policy_rejected_logps - ref_rejected_logps
    h = chosen_ratio - rejected_ratio
    if loss_type == "sigmoid":
        losses = -(1 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(-beta * h)
    else:
        losses = (h - 1 / (2 * beta)) ** 2
    return losses, beta * chosen_ratio.detach(), beta * rejected_ratio.detach()


def simpo_loss(policy_chosen_logps: torch.Tensor, policy_rejected_logps: torch.Tensor, *, beta: float = 2.0,
               gamma: float = 0.5, label_smoothing: float = 0.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair SimPO losses (B,) from per-token mean log-probs (B,) of the chosen and rejected
    completions (reference-free, target margin ``gamma``), and the rewards β·π̄ (detached), as
    TRL's CPOTrainer with ``loss_type="simpo"`` (``simpo_gamma`` = gamma)."""
    _check_beta(beta)
    _check_smoothing(label_smoothing)
    z = beta * (policy_chosen_logps - policy_rejected_logps) - gamma
    losses = -(1 - label_smoothing) * F.logsigmoid(z) - label_smoothing * F.logsigmoid(-z)
    return losses, beta * policy_chosen_logps.detach(), beta * policy_rejected_logps.detach()


@dataclass
class DPOConfig:
    """The preference-optimization settings (the TrainerConfig holds the optimization ones).

    loss: "sigmoid" (DPO), "ipo" or "simpo"; beta: β (DPO/IPO default 0.1; SimPO uses 2.0 in its
    paper: set it); label_smoothing ε (sigmoid and simpo); simpo_gamma γ; reference: see
    :data:`REFERENCES` (None: "none" for SimPO, "adapters_off" for a LoRA model, else "precompute").
    """

    loss: str = "sigmoid"
    beta: float = 0.1
    label_smoothing: float = 0.0
    simpo_gamma: float = 0.5
    reference: str | None = None

    def __post_init__(self) -> None:
        if self.loss not in DPO_LOSSES:
            raise ValueError(f"DPOConfig.loss must be one of {DPO_LOSSES}, got {self.loss!r}")
        _check_beta(self.beta)
        _check_smoothing(self.label_smoothing)
        if self.loss == "ipo" and self.label_smoothing:
            raise ValueError("DPOConfig.label_smoothing applies to the sigmoid and simpo losses, not ipo")
        if self.reference is not None and self.reference not in REFERENCES:
            raise ValueError(f"DPOConfig.reference must be one of {REFERENCES}, got {self.reference!r}")
        if self.loss == "simpo" and self.reference not in (None, "none"):
            raise ValueError(f"DPOConfig: SimPO is reference-free; reference must be None or 'none', got "
                             f"{self.reference!r}")
        if self.loss != "simpo" and self.reference == "none":
            raise ValueError(f"DPOConfig: loss {self.loss!r} needs a reference ('precompute' or 'adapters_off')")

    @property
    def average(self) -> bool:
        """IPO and SimPO use per-token mean log-probs; DPO sums."""
        return self.loss in ("ipo", "simpo")


class DPOTrainer(Trainer):
    """DPO/IPO/SimPO on :class:`~fastlm.align.data.PairSource` batches (mean loss over pairs),
    training a fastlm ``Model`` (all weights) or a ``LoraModel`` (its active adapter; checkpoints
    are PEFT adapter directories, as :class:`fastlm.peft.tuning.AdapterTrainer`)."""

    progress_metrics = ("rewards/accuracies",)

    def __init__(self, model: Model | LoraModel, train_source, config: TrainerConfig, dpo: DPOConfig | None = None,
                 **kwargs) -> None:
        dpo = dpo or DPOConfig()
        lora = isinstance(model, LoraModel)
        if not lora and not isinstance(model, Model):
            raise TypeError(f"DPOTrainer trains a fastlm Model or LoraModel, got {type(model).__name__}")
        reference = dpo.reference or ("none" if dpo.loss == "simpo" else "adapters_off" if lora else "precompute")
        if reference == "adapters_off" and not lora:
            raise ValueError("DPOConfig.reference='adapters_off' needs a LoraModel (the base model with adapters "
                             "disabled is the reference); a fully trained model uses 'precompute'")
        if lora:
            if model.active_adapter is None or not any(p.requires_grad for p in model.parameters()):
                raise ValueError("DPOTrainer: the LoraModel has no trainable active adapter")
        if config.fsdp:
            raise ValueError("DPOTrainer: fsdp is not supported yet; train with DDP")
        super().__init__(model, train_source, config, **kwargs)
        self.dpo = dataclasses.replace(dpo, reference=reference)
        self.lora = lora
        self._ref_cache: dict[int, torch.Tensor] = {}  # id(source) -> (N, 2) reference log-probs on the host
        self._stats: torch.Tensor | None = None
        #: policy loss through fastlm.ops.linear_preference_loss (when the head is fusable; see
        #: fastlm.align.logprobs.preference_rows), else sequence log-probs + dpo_loss / simpo_loss
        self.fused = True

    # ---- reference log-probs --------------------------------------------------------------

    def _sequence_logps(self, model, batch: dict) -> torch.Tensor:
        """(2b,) summed (or per-token mean) completion log-probs of a device batch."""
        return sequence_logprobs(model, batch["input_ids"], batch["loss_mask"], attention_mask=batch["attention_mask"],
                                 average=self.dpo.average, validate=False)

    @torch.no_grad()
    def reference_logps(self, source) -> torch.Tensor:
        """(N, 2) [chosen, rejected] reference log-probs of every example of ``source``, computed
        with the model as it is now (call before training), in its eval mode."""
        was_training = self.model.training
        self.model.eval()
        out = []
        try:
            examples = source.examples
            for start in range(0, len(examples), self.config.batch_size):
                batch = self._to_device(collate_pairs(examples[start:start + self.config.batch_size], source.pad_id))
                with self._autocast():
                    logps = self._sequence_logps(self.model, batch).float()
                out.append(torch.stack(logps.chunk(2), dim=1))
        finally:
            self.model.train(was_training)
        return torch.cat(out).cpu()  # one read per pass, before training

    def _build(self) -> None:
        super()._build()
        if self.dpo.reference == "precompute":  # the initial weights: before a resume loads newer ones
            for source in (self.train_source, self.val_source):
                if source is not None and id(source) not in self._ref_cache:
                    self._ref_cache[id(source)] = self.reference_logps(source)
                    logger.info("reference log-probs cached for %d pairs", len(source.examples))

    def _with_reference(self, batches: list, source) -> list:
        if self.dpo.reference != "precompute":
            return batches
        cache = self._ref_cache[id(source)]
        return [(dict(b, ref_logps=cache[b["index"]]), n) for b, n in batches]

    def _fetch(self, step: int) -> list:
        return self._with_reference(super()._fetch(step), self.train_source)

    def _fetch_eval(self) -> list:
        return self._with_reference(super()._fetch_eval(), self.val_source)

    # ---- loss -----------------------------------------------------------------------------

    def _check_batch(self, batch: dict, what: str) -> int:
        return check_pair_batch(batch, self.model.config.vocab_size, what)

    def _loss_sum(self, batch: dict[str, Any], num_targets: int) -> torch.Tensor:
        dpo = self.dpo
        with self._autocast():
            # the policy's forward first (then the reference's: the same order of random draws either way)
            rows = preference_rows(self.forward, batch["input_ids"], batch["loss_mask"],
                                   attention_mask=batch["attention_mask"], validate=False) if self.fused else None
            logps = None if rows is not None else self._sequence_logps(self.forward, batch).float()
            if dpo.reference == "adapters_off":
                with torch.no_grad(), self.model.disable_adapter():
                    ref = self._sequence_logps(self.model, batch).float()
                ref = torch.stack(ref.chunk(2), dim=1)
            else:
                ref = batch.get("ref_logps")
            if rows is not None:  # the fused op: loss and gradients in one pass over the head, no logits
                hidden, weight, targets, mask, softcap = rows
                out = ops.linear_preference_loss(hidden, weight, targets, mask, None if dpo.loss == "simpo" else ref,
                                                 loss=dpo.loss, beta=dpo.beta, gamma=dpo.simpo_gamma,
                                                 label_smoothing=dpo.label_smoothing, ignore_index=IGNORE,
                                                 softcap=softcap, validate=False)
                loss_sum, r_c, r_r = out.loss, out.chosen_rewards.float(), out.rejected_rewards.float()
        if rows is None:
            chosen, rejected = logps.chunk(2)
            if dpo.loss == "simpo":
                losses, r_c, r_r = simpo_loss(chosen, rejected, beta=dpo.beta, gamma=dpo.simpo_gamma,
                                              label_smoothing=dpo.label_smoothing)
            else:
                losses, r_c, r_r = dpo_loss(chosen, rejected, ref[:, 0], ref[:, 1], beta=dpo.beta,
                                            loss_type=dpo.loss, label_smoothing=dpo.label_smoothing)
            loss_sum = losses.sum()
        if self.model.training:
            stats = torch.stack((r_c.sum(), r_r.sum(), (r_c > r_r).float().sum(), (r_c - r_r).sum(),
                                 torch.tensor(float(r_c.shape[0]), device=r_c.device)))
            self._stats = stats if self._stats is None else self._stats + stats
        return loss_sum

    def _step_metrics(self) -> dict[str, float]:
        if self._stats is None:
            return {}
        chosen, rejected, correct, margin, count = self._stats.tolist()  # a second, small read per step
        self._stats = None
        return {"rewards/chosen": chosen / count, "rewards/rejected": rejected / count,
                "rewards/accuracies": correct / count, "rewards/margins": margin / count}

    # ---- checkpoints: LoRA runs write PEFT adapter directories (as AdapterTrainer) ----------

    def _gather_model(self):
        return None if self.lora else super()._gather_model()

    def _write_model(self, directory: Path, gathered) -> None:
        if self.lora:
            AdapterTrainer._write_model(self, directory, gathered)
        else:
            super()._write_model(directory, gathered)

    def _load_model(self, directory: Path, optimizer_state: dict) -> None:
        if self.lora:
            AdapterTrainer._load_model(self, directory, optimizer_state)
        else:
            super()._load_model(directory, optimizer_state)

    def _extra_state(self) -> dict:
        return {"adapter_name": self.model.active_adapter} if self.lora else {}


@dataclass
class DPOOutput:
    model: Model | LoraModel
    tokenizer: object
    result: TrainResult


def train_dpo(config: TrainerConfig, *, data: str, model_dir: str, dpo: DPOConfig | None = None,
              method: str = "full", lora: LoraConfig | None = None, template: str | None = None, seq_len: int = 512,
              val_data: str | None = None, val_fraction: float = 0.05, on_bad_row: str = "error",
              resume: bool = False, overwrite: bool = False) -> DPOOutput:
    """DPO/IPO/SimPO of the causal-LM checkpoint in ``model_dir`` on preference rows (pairs or
    rankings, see :mod:`fastlm.align.data`), all weights (``method="full"``) or a LoRA adapter
    (``"lora"``, reference = the base with adapters off). Checkpoints in ``<out>/checkpoints``:
    model directories (full) or PEFT adapter directories (LoRA), with the tokenizer."""
    if method not in ("full", "lora"):
        raise ValueError(f"{shown('method')} must be 'full' or 'lora', got {method!r}")
    dpo = dpo or DPOConfig()
    lora = dataclasses.replace(lora or LoraConfig(), base_model_name_or_path=str(Path(model_dir).resolve()))
    prepared = prepare_pairs(config, data=data, model_dir=model_dir, template=template, seq_len=seq_len,
                             val_data=val_data, val_fraction=val_fraction, on_bad_row=on_bad_row, resume=resume,
                             overwrite=overwrite, settings=dict(command="dpo", method=method,
                                                                dpo=dataclasses.asdict(dpo),
                                                                lora=dataclasses.asdict(lora) if method == "lora"
                                                                else None))
    model = from_pretrained(model_dir, dtype=torch.float32)
    if method == "lora":
        torch.manual_seed(config.seed)  # the same adapter initialisation in every process and run
        model = LoraModel(model, lora)

    def extra_files(directory: Path) -> None:
        prepared.tokenizer.save(directory)

    trainer = DPOTrainer(model, prepared.train, config, dpo, val_source=prepared.val, extra_files=extra_files)
    return DPOOutput(model, prepared.tokenizer, trainer.fit(resume=resume))
