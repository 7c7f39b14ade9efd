"""The training engine every fastlm recipe runs on.

Per optimizer step: ``grad_accum`` micro-batches from a deterministic batch source (see
:mod:`fastlm.train.data`), the summed token loss divided by the step's total number of target
tokens over all micro-batches and processes (so N processes give the losses of one process on
the same global batch), AdamW (fused on CUDA), warmup + cosine/linear/constant decay, gradient
clipping, bf16 autocast or fp16 with loss scaling, optional activation checkpointing and
torch.compile. Logs ``metrics.jsonl``, shows a progress bar, writes atomic checkpoints that
resume exactly, and a loss-curve PNG at the end.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import random
import signal
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from tqdm.auto import tqdm

from fastlm import ops
from fastlm._naming import shown
from fastlm.io.checkpoint import read_safetensors
from fastlm.io.hf_format import CheckpointError, state_dict_from_hf
from fastlm.model import Model
from fastlm.train import checkpoint as ckpt
from fastlm.train import distributed, rundir
from fastlm.train.data import IGNORE_INDEX
from fastlm.train.interrupt import StopOnSignal, TrainingInterrupted
from fastlm.train.metrics import PLOT_FILE, MetricsLog, plot_losses

logger = logging.getLogger(__name__)

PRECISIONS = ("fp32", "bf16", "fp16")
SCHEDULES = ("cosine", "linear", "constant")
NAN_POLICIES = ("stop", "skip")
_LAYOUT_KEYS = ("key_lens", "cu_seqlens", "max_seqlen", "causal")


class BatchSource(Protocol):
    def batch(self, micro_batch: int, rank: int = 0, world_size: int = 1) -> dict: ...


def default_warmup(max_steps: int) -> int:
    """The warmup used when none is given: min(100, 10% of max_steps)."""
    return min(100, max_steps // 10)


@dataclass
class TrainerConfig:
    out: str = "runs/train"
    max_steps: int = 1000
    batch_size: int = 16  # sequences per micro-batch, summed over all processes
    grad_accum: int = 1  # micro-batches per optimizer step
    lr: float = 3e-4
    min_lr_ratio: float = 0.1  # the schedule decays to lr · min_lr_ratio
    warmup_steps: int | None = None  # None: min(100, max_steps // 10), so short runs reach lr
    schedule: str = "cosine"
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = 1.0  # max global gradient norm; 0 disables clipping
    precision: str = "fp32"
    activation_checkpointing: bool = False
    compile: bool = False
    # ops.fused_linear_cross_entropy instead of logits + cross_entropy; None: fused on CUDA when the
    # head is a plain linear layer (not sharded by fsdp), logits + cross_entropy elsewhere
    fused_loss: bool | None = None
    fsdp: bool = False  # FSDP2 sharding instead of DDP (multi-process runs)
    seed: int = 0
    eval_every: int = 0  # steps between validations; 0: only at the end
    eval_batches: int = 8
    save_every: int = 0  # steps between checkpoints; 0: only at the end
    keep_last: int = 3
    nan_policy: str = "stop"  # a NaN/inf loss stops the run, or its update is skipped
    device: str | None = None  # None: CUDA when available
    progress: bool = True

    def __post_init__(self) -> None:
        self.betas = tuple(self.betas)
        if self.warmup_steps is None and isinstance(self.max_steps, int):
            self.warmup_steps = default_warmup(self.max_steps)
        for name in ("max_steps", "batch_size", "grad_accum", "eval_batches", "keep_last"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"TrainerConfig.{name} must be a positive integer, got {value!r}")
        for name in ("warmup_steps", "eval_every", "save_every", "seed"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"TrainerConfig.{name} must be an integer >= 0, got {value!r}")
        choices = {"precision": PRECISIONS, "schedule": SCHEDULES, "nan_policy": NAN_POLICIES}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"TrainerConfig.{name} must be one of {allowed}, got {getattr(self, name)!r}")
        if not self.lr > 0:
            raise ValueError(f"TrainerConfig.lr must be > 0, got {self.lr}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"TrainerConfig.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if self.weight_decay < 0 or self.grad_clip < 0:
            raise ValueError("TrainerConfig.weight_decay and grad_clip must be >= 0")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"TrainerConfig.betas must be two numbers in [0, 1), got {self.betas}")
        if self.fused_loss and self.fsdp:
            raise ValueError("TrainerConfig.fused_loss is not supported with fsdp yet (the head is sharded)")

    def lr_factor(self, step: int) -> float:
        """Multiplier of lr at optimizer step ``step`` (0-based): linear warmup, then decay."""
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        progress = min(1.0, (step - self.warmup_steps) / max(1, self.max_steps - self.warmup_steps))
        if self.schedule == "constant":
            return 1.0
        decay = 0.5 * (1 + math.cos(math.pi * progress)) if self.schedule == "cosine" else 1 - progress
        return self.min_lr_ratio + (1 - self.min_lr_ratio) * decay


@dataclass
class TrainResult:
    losses: list[float]
    val_loss: float | None
    start_step: int
    steps: int

    @property
    def val_perplexity(self) -> float | None:
        return None if self.val_loss is None else math.exp(self.val_loss)


_PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "H800": 989e12, "A100": 312e12, "L40S": 362e12, "A10": 125e12}


def peak_flops(device: torch.device) -> float | None:
    """Dense bf16 peak of known GPUs (for MFU), None elsewhere."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((flops for key, flops in _PEAK_BF16_FLOPS.items() if key in name), None)


def flops_per_token(model: Model, seq_len: int) -> float:
    """Training FLOPs per token: 6·N for the matmuls (forward + backward; the embedding counts
    once, for the output head) + 12·layers·hidden·seq_len for the attention scores."""
    config = model.config
    return 6 * model.num_parameters() + 12 * config.num_layers * config.hidden_size * seq_len


class StepTimer:
    """Time between marks without a sync of its own: on CUDA, events recorded in the stream at
    each mark, read after the step's one device→host read (by then the events are complete);
    elsewhere the host clock. :meth:`elapsed` is the time from the previous mark (or restart)."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self._previous = self._current = None

    def _now(self):
        if not self.cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def restart(self) -> None:
        self._previous = self._current = self._now()

    def mark(self) -> None:
        """Call just before the step's device→host read."""
        if self._current is None:
            self.restart()
        self._previous, self._current = self._current, self._now()

    def elapsed(self) -> float:
        """Seconds between the last two marks (call after the read that follows :meth:`mark`)."""
        if self.cuda:
            return self._previous.elapsed_time(self._current) / 1e3
        return self._current - self._previous


class Trainer:
    def __init__(
        self,
        model: Model,
        train_source: BatchSource,
        config: TrainerConfig,
        *,
        val_source: BatchSource | None = None,
        extra_files: Callable[[Path], None] | None = None,
    ) -> None:
        """``extra_files(directory)`` adds files to each checkpoint (e.g. the tokenizer)."""
        self.model, self.train_source, self.val_source, self.config = model, train_source, val_source, config
        self.extra_files = extra_files
        self.info = distributed.setup(config.device)
        if config.fsdp and self.info.world_size == 1:
            raise ValueError(f"{shown('fsdp')} shards the model over several processes: launch with torchrun "
                             "--nproc-per-node N (one process trains without it)")
        if config.batch_size % self.info.world_size:
            raise ValueError(
                f"batch_size {config.batch_size} must be divisible by the {self.info.world_size} processes"
            )
        self.out = Path(config.out)

    # ---- set-up ---------------------------------------------------------------------------

    def _build(self) -> None:
        config, info = self.config, self.info
        torch.manual_seed(config.seed)
        random.seed(config.seed)
        self.model.to(info.device)
        self.model.gradient_checkpointing = config.activation_checkpointing
        self.wrapped = distributed.wrap(self.model, info, fsdp=config.fsdp)
        self.forward = torch.compile(self.wrapped) if config.compile else self.wrapped
        params = [p for p in self.wrapped.parameters() if p.requires_grad]
        groups = [
            {"params": [p for p in params if p.dim() >= 2], "weight_decay": config.weight_decay},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
        ]
        # fused AdamW (CUDA and CPU) keeps its step count on the device: no host read per step
        fused = info.device.type in ("cuda", "cpu") and not config.fsdp
        self.optimizer = torch.optim.AdamW(groups, lr=config.lr, betas=config.betas, fused=fused or None)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, config.lr_factor)
        self.scaler = torch.amp.GradScaler(info.device.type, enabled=config.precision == "fp16")
        self._fused = self._use_fused_loss()
        self._nominal: float | None = None  # 1 / the backward's constant scale (see _run_step)
        self._head_cast: tuple | None = None  # (optimizer step, dtype) -> the head weight cast for it
        self._optimizer_steps = 0
        self._timer = StepTimer(info.device)
        self._step_seconds = 0.0

    def _autocast(self):
        if self.config.precision == "fp32":
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if self.config.precision == "bf16" else torch.float16
        return torch.autocast(self.info.device.type, dtype=dtype)

    # ---- checkpoints ----------------------------------------------------------------------

    def _gather_model(self) -> Any:
        """What :meth:`_write_model` saves, gathered by every process (collective under FSDP)."""
        return distributed.full_model_state(self.wrapped)

    def _write_model(self, directory: Path, gathered: Any) -> None:
        """Write the model part of a checkpoint: a Hugging Face checkpoint directory."""
        self.model.save_pretrained(directory, state_dict=gathered)

    def _load_model(self, directory: Path, optimizer_state: dict) -> None:
        """Load the model part of a checkpoint, and the optimizer state, into the wrapped model."""
        model_state = state_dict_from_hf(self.model.config, read_safetensors(directory))
        distributed.load_full_state(self.wrapped, self.optimizer, model_state, optimizer_state)

    def _extra_state(self) -> dict[str, Any]:
        """Entries added to trainer_state.pt by subclasses."""
        return {}

    def _step_metrics(self) -> dict[str, float]:
        """Entries added by subclasses to the step's metrics.jsonl record (after :meth:`_step`);
        the names in ``self.progress_metrics`` also show on the progress bar."""
        return {}

    def save_checkpoint(self, step: int) -> Path | None:
        """Write ``step-<step>`` (every process takes part; the main one writes)."""
        gathered = self._gather_model()
        optimizer_state = distributed.full_optimizer_state(self.wrapped, self.optimizer)
        path = None
        if self.info.is_main:
            state = {
                "step": step,
                "micro_batches": step * self.config.grad_accum,
                "optimizer": optimizer_state,
                "scheduler": self.scheduler.state_dict(),
                "scaler": self.scaler.state_dict(),
                "rng": ckpt.rng_state(),
                "config": {k: v for k, v in dataclasses.asdict(self.config).items() if k != "device"},
                **self._extra_state(),
            }

            def write(directory: Path) -> None:
                self._write_model(directory, gathered)
                ckpt.save_trainer_state(directory, state)
                if self.extra_files is not None:
                    self.extra_files(directory)

            path = ckpt.write_checkpoint(self.out, step, write, self.config.keep_last)
            logger.info("saved checkpoint %s", path)
        distributed.barrier()
        return path

    def _resume(self) -> int:
        """Load the newest intact checkpoint (damaged newer ones are set aside with a warning)."""
        if self.info.is_main:
            ckpt.clean_temporaries(self.out)
            latest, skipped = ckpt.latest_intact_checkpoint(self.out)
            for path, problem in skipped:
                moved = ckpt.set_aside(path)
                logger.warning("checkpoint %s is damaged (%s): moved to %s; resuming from %s instead", path.name,
                               problem, moved.name, latest.name if latest is not None else "nothing")
            if latest is None and skipped:
                raise CheckpointError(f"every checkpoint in {ckpt.checkpoint_dir(self.out)} is damaged (set aside "
                                      f"as damaged-*); start the run again with {shown('overwrite')}")
        distributed.barrier()
        latest = ckpt.latest_checkpoint(self.out)
        if latest is None:
            logger.warning("%s: no checkpoint in %s yet; starting from scratch", shown("resume"),
                           ckpt.checkpoint_dir(self.out))
            return 0
        state = ckpt.load_trainer_state(latest)
        current = {k: v for k, v in dataclasses.asdict(self.config).items() if k != "device"}
        refused, _ = rundir.compare_settings(state.get("config", {}), current)
        if refused:
            raise rundir.ResumeMismatchError(f"cannot resume from {latest}: " + "; ".join(refused))
        self._load_model(latest, state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        ckpt.set_rng_state(state["rng"])
        logger.info("resumed from %s (step %d)", latest, state["step"])
        return int(state["step"])

    # ---- the loop -------------------------------------------------------------------------

    def _use_fused_loss(self) -> bool:
        """TrainerConfig.fused_loss, resolved: None means fused on CUDA with a plain linear head."""
        model = distributed.unwrap(self.model)
        softcapped = getattr(getattr(model, "config", None), "final_softcap", None) is not None
        if self.config.fused_loss is not None:
            if self.config.fused_loss and softcapped:
                raise ValueError("TrainerConfig.fused_loss cannot apply the model's final logit soft-cap "
                                 "(Gemma 2); train it with fused_loss=False")
            return self.config.fused_loss
        head = model.lm_head
        return (self.info.device.type == "cuda" and not self.config.fsdp and not softcapped
                and type(head) is torch.nn.Linear)

    def _head_weight(self, dtype: torch.dtype) -> torch.Tensor:
        """The LM head's weight in ``dtype``, cast once per optimizer step (not per micro-batch):
        the weight only changes at the optimizer step. Gradients flow back to the float weight."""
        weight = distributed.unwrap(self.wrapped).lm_head.weight
        if weight.dtype == dtype:
            return weight
        key = (self._optimizer_steps, dtype)
        if self._head_cast is None or self._head_cast[0] != key:
            self._head_cast = (key, weight.to(dtype))
        return self._head_cast[1]

    def _stop_requested(self, stop: StopOnSignal) -> bool:
        """Whether a signal asked to stop (in any process: they agree, so all save and stop)."""
        if self.info.world_size == 1:
            return stop.signum is not None
        flag = torch.tensor([0.0 if stop.signum is None else 1.0], device=self.info.device)
        return bool(distributed.all_reduce_sum(flag).item())

    def _loss_sum(self, batch: dict[str, Any], num_targets: int) -> torch.Tensor:
        """Summed next-token loss of a device micro-batch (a zero that keeps the graph when it has
        no target). ``num_targets`` is the host count from :meth:`_check_batch`; no value is read back
        from the device (the batch was validated at the data boundary)."""
        layout = {k: batch[k] for k in _LAYOUT_KEYS if k in batch}
        labels = batch["labels"].flatten()
        with self._autocast():
            if self._fused:
                hidden = self.forward(batch["input_ids"], return_hidden=True, validate=False, **layout)
                head = self._head_weight(hidden.dtype)
                mean = ops.fused_linear_cross_entropy(hidden.flatten(0, 1), head, labels, validate=False)
                anchor = hidden
            else:
                logits = self.forward(batch["input_ids"], validate=False, **layout)
                mean = ops.cross_entropy(logits.flatten(0, 1), labels, validate=False)
                anchor = logits
        return mean.float() * num_targets if num_targets else anchor.float().sum() * 0.0

    def _to_device(self, batch: dict[str, Any]) -> dict[str, Any]:
        return {k: v.to(self.info.device, non_blocking=True) if isinstance(v, torch.Tensor) else v
                for k, v in batch.items()}

    def _check_batch(self, batch: dict[str, Any], what: str) -> int:
        """The data boundary: check a micro-batch as the source gave it (on the host) — token ids
        and targets in [0, vocab) (targets may be IGNORE_INDEX) — and return its number of targets.
        The device path then reads nothing back for validation."""
        vocab = self.model.config.vocab_size
        ids, labels = batch["input_ids"], batch["labels"]
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= vocab):
            raise ValueError(f"{what}: input_ids must be in [0, {vocab}), got values in "
                             f"[{int(ids.min())}, {int(ids.max())}]")
        targets = labels[labels != IGNORE_INDEX]
        if targets.numel() and (int(targets.min()) < 0 or int(targets.max()) >= vocab):
            raise ValueError(f"{what}: labels must be in [0, {vocab}) or {IGNORE_INDEX}, got values in "
                             f"[{int(targets.min())}, {int(targets.max())}]")
        return int(targets.numel())

    def _fetch(self, step: int) -> list[tuple[dict[str, Any], int]]:
        """The micro-batches of optimizer step ``step`` with their target counts, checked on the host."""
        config, info = self.config, self.info
        out = []
        for i in range(config.grad_accum):
            batch = self.train_source.batch(step * config.grad_accum + i, info.rank, info.world_size)
            out.append((batch, self._check_batch(batch, f"step {step + 1}, micro-batch {i}")))
        return out

    def _step(self, step: int) -> tuple[float, float, int]:
        """One optimizer step: returns (loss, grad norm, tokens processed by this process)."""
        return self._run_step(step, self._fetch(step))

    def _run_step(self, step: int, batches: list[tuple[dict[str, Any], int]]) -> tuple[float, float, int]:
        """Forward/backward of the micro-batches, one all-reduce, one device→host read, the update.

        The loss is Σ token losses / T over all micro-batches and processes (T: the global number
        of targets). T is only known after the all-reduce, so the backward runs on the sums
        scaled by a constant a ≈ 1 / (batch_size · grad_accum · context length), a power of two
        taken from the config (the same on every process and across resumes, so DDP's gradient
        average stays a multiple of ∇Σ and rounds alike), and the gradients are then multiplied
        by 1 / (a·T) on the device. The one all-reduce carries [Σ losses, T]; the one
        read (loss, T, grad norm) decides the NaN policy before the optimizer steps.
        """
        config, info = self.config, self.info
        device = info.device
        if self._nominal is None:  # from the config only: the same on every process and after a resume
            positions = config.batch_size * config.grad_accum * self.model.config.max_position_embeddings
            self._nominal = 2.0 ** round(math.log2(positions))  # a power of two: rounding-neutral
        loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        count = torch.zeros((), dtype=torch.float64, device=device)
        for i, (batch, num_targets) in enumerate(batches):
            batch = self._to_device(batch)
            sync = i == len(batches) - 1 or not hasattr(self.wrapped, "no_sync")
            with contextlib.nullcontext() if sync else self.wrapped.no_sync():
                part = self._loss_sum(batch, num_targets)
                # DDP/FSDP average gradients over processes: world_size · a · Σ averages to a · ΣΣ.
                self.scaler.scale(part * (info.world_size / self._nominal)).backward()
            loss_sum += part.detach()
            count += (batch["labels"] != IGNORE_INDEX).sum()
        stats = distributed.all_reduce_sum(torch.stack((loss_sum, count)), device)  # [Σ loss, T] over processes
        self.scaler.unscale_(self.optimizer)
        grads = [p.grad for p in self.wrapped.parameters() if p.grad is not None]
        if grads:  # from a·∇ΣΣ to ∇ΣΣ / T
            torch._foreach_mul_(grads, (self._nominal / stats[1]).float())
        norm = torch.nn.utils.clip_grad_norm_(self.wrapped.parameters(), config.grad_clip or math.inf)
        norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm
        summary = torch.stack((stats[0], stats[1], norm.double()))
        self._timer.mark()
        total_loss, total, grad_norm = summary.tolist()  # the step's one device→host read
        self._step_seconds = self._timer.elapsed()
        if total == 0:
            raise ValueError(f"step {step + 1}: the global batch has no target token (all labels are -100)")
        loss = total_loss / total
        finite = math.isfinite(loss) and (math.isfinite(grad_norm) or config.precision == "fp16")
        if not finite:
            self.optimizer.zero_grad(set_to_none=True)
            self.scaler.update()
            if config.nan_policy == "stop":
                raise FloatingPointError(
                    f"loss is {loss} (gradient norm {grad_norm}) at step {step + 1}; stopping without saving "
                    "this state (nan_policy='skip' skips such steps instead)"
                )
            logger.warning("loss is %s at step %d; update skipped", loss, step + 1)
            with warnings.catch_warnings():  # the schedule advances although no update was made
                warnings.simplefilter("ignore", UserWarning)
                self.scheduler.step()
        else:
            self.scaler.step(self.optimizer)
            self.scaler.update()
            self.optimizer.zero_grad(set_to_none=True)
            self.scheduler.step()
        self._optimizer_steps += 1
        return loss, grad_norm, sum(int(b["input_ids"].numel()) for b, _ in batches)

    def _fetch_eval(self) -> list[tuple[dict[str, Any], int]]:
        """The validation micro-batches with their target counts, checked on the host."""
        info = self.info
        batches = [self.val_source.batch(i, info.rank, info.world_size) for i in range(self.config.eval_batches)]
        return [(b, self._check_batch(b, f"validation batch {i}")) for i, b in enumerate(batches)]

    @torch.no_grad()
    def _eval_totals(self, batches: list[tuple[dict[str, Any], int]]) -> torch.Tensor:
        """[Σ target losses, number of targets] over the validation micro-batches of every
        process: float64 (2,) on the training device, one all-reduce, no read."""
        was_training = self.model.training
        self.model.eval()
        totals = torch.zeros(2, dtype=torch.float64, device=self.info.device)
        for batch, num_targets in batches:
            batch = self._to_device(batch)
            part = self._loss_sum(batch, num_targets).double()
            totals += torch.stack((part, (batch["labels"] != IGNORE_INDEX).sum().double()))
        self.model.train(was_training)
        return distributed.all_reduce_sum(totals, self.info.device)

    def evaluate(self) -> float:
        """Mean target-token loss over eval_batches micro-batches of the validation source."""
        if self.val_source is None:
            raise ValueError("no validation source was given")
        if not hasattr(self, "wrapped"):
            raise RuntimeError("Trainer.evaluate: call fit() first (the model is not set up for training yet)")
        loss_sum, count = self._eval_totals(self._fetch_eval()).tolist()  # the evaluation's one device→host read
        return loss_sum / count

    def fit(self, *, resume: bool = False, stop_at: int | None = None) -> TrainResult:
        """Train to config.max_steps (from the latest checkpoint with ``resume``). ``stop_at``
        ends the run early after that step, with a checkpoint, as a time-limited job would.
        SIGINT/SIGTERM end the run after the current step, with a checkpoint of it, raising
        :class:`~fastlm.train.interrupt.TrainingInterrupted` (see that module)."""
        with StopOnSignal() as self._stop:
            return self._fit(resume, stop_at)

    def _fit(self, resume: bool, stop_at: int | None) -> TrainResult:
        config, info, stop = self.config, self.info, self._stop
        end = config.max_steps if stop_at is None else min(stop_at, config.max_steps)
        self._build()
        start = self._resume() if resume else 0
        metrics = MetricsLog(self.out, resume_step=start if resume else None) if info.is_main else None
        seq_len = self.train_source.batch(0, info.rank, info.world_size)["input_ids"].shape[1]
        peak = peak_flops(info.device)
        per_token = flops_per_token(self.model, seq_len)
        losses: list[float] = []
        val_loss = None
        self.model.train()
        bar = tqdm(range(start, end), initial=start, total=config.max_steps, desc="train",
                   disable=not (config.progress and info.is_main), dynamic_ncols=True)
        self._timer.restart()
        for step in bar:
            lr = self.scheduler.get_last_lr()[0]
            loss, grad_norm, tokens = self._step(step)
            tokens_per_s = tokens * info.world_size / max(self._step_seconds, 1e-9)
            losses.append(loss)
            record = {"step": step + 1, "loss": loss, "lr": lr, "grad_norm": grad_norm, "tokens_per_s": tokens_per_s}
            postfix = {"loss": f"{loss:.3f}", "tok/s": f"{tokens_per_s:,.0f}"}
            extra = self._step_metrics()
            record.update(extra)
            postfix.update({k: f"{extra[k]:.3g}" for k in getattr(self, "progress_metrics", ()) if k in extra})
            if peak is not None:
                record["mfu"] = tokens_per_s * per_token / (peak * info.world_size)
                postfix["mfu"] = f"{record['mfu']:.1%}"
            last = step + 1 == end
            if self.val_source is not None and (last or (config.eval_every and (step + 1) % config.eval_every == 0)):
                val_loss = self.evaluate()
                record.update(val_loss=val_loss, val_perplexity=math.exp(min(val_loss, 700)))
                postfix["val"] = f"{val_loss:.3f}"
            bar.set_postfix(postfix)
            if metrics is not None:
                metrics.log(record)
            saved = last or (config.save_every and (step + 1) % config.save_every == 0)
            if saved:
                self.save_checkpoint(step + 1)
            if "val_loss" in record or saved:
                self._timer.restart()  # evaluation and checkpoint time is not the next step's
            if not last and self._stop_requested(stop):
                if not saved:  # the last completed step, atomically as every checkpoint
                    self.save_checkpoint(step + 1)
                bar.close()
                if metrics is not None:
                    plot_losses(metrics.read(), self.out / PLOT_FILE)
                path = ckpt.checkpoint_dir(self.out) / f"step-{step + 1:08d}"
                raise TrainingInterrupted(stop.signum or signal.SIGTERM, step + 1, path)
        if metrics is not None:
            plot_losses(metrics.read(), self.out / PLOT_FILE)
        return TrainResult(losses=losses, val_loss=val_loss, start_step=start, steps=end)
