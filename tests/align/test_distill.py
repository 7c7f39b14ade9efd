"""DistillTrainer: the loss it trains is the distillation formula on full logits (temperature, α,
divergence, ignored positions), the teacher is frozen and gets no gradient, the student learns,
validation is the student's cross-entropy, resume is exact, and mismatched pairs are refused."""

import json
import math

import pytest
import torch
import torch.nn.functional as F

from fastlm import Model, ModelConfig
from fastlm.align.distill import DistillConfig, DistillTrainer, check_compatible
from fastlm.data import HFTokenizer
from fastlm.train import PackedSource, TrainerConfig
from fastlm.train.data import IGNORE_INDEX
from tests.ops.test_every_op import kd_from_logits

V = 40
TEACHER = ModelConfig(vocab_size=V, hidden_size=48, num_layers=2, num_heads=4, num_kv_heads=2,
                      max_position_embeddings=64)
STUDENT = ModelConfig(vocab_size=V, hidden_size=16, num_layers=1, num_heads=2, max_position_embeddings=64)


def _stream(n=3000, seed=0):
    g = torch.Generator().manual_seed(seed)
    pattern = torch.randint(1, V, (29,), generator=g)
    return pattern.repeat(n // 29 + 1)[:n]


def _models(seed=0):
    torch.manual_seed(seed)
    teacher = Model(TEACHER)
    with torch.no_grad():  # a confident teacher: its distribution is far from the student's
        teacher.lm_head.weight.mul_(40)
    torch.manual_seed(seed + 1)
    return teacher, Model(STUDENT)


def _trainer(tmp_path, steps=8, loss=None, models=None, **overrides):
    teacher, student = models or _models()
    source = PackedSource(_stream(), seq_len=16, batch_size=4, seed=0)
    val = PackedSource(_stream(seed=0)[:400], seq_len=16, batch_size=4, seed=1)
    options = dict(out=str(tmp_path), max_steps=steps, batch_size=4, lr=1e-2, warmup_steps=2, progress=False,
                   eval_batches=2, device="cpu")
    options.update(overrides)
    return DistillTrainer(student, teacher, source, TrainerConfig(**options), loss or DistillConfig(),
                          val_source=val)


def _hand_loss(teacher, student, input_ids, labels, *, temperature, alpha, divergence, beta=0.5):
    """The formula on full float64 logits: mean over labelled tokens of α·T²·D + (1−α)·CE."""
    zt = teacher(input_ids).double().flatten(0, 1)
    zs = student(input_ids).double().flatten(0, 1)
    return kd_from_logits(zs, zt, labels.flatten(), temperature, divergence, beta, alpha, IGNORE_INDEX)


def _batch(seed=3):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, V, (3, 11), generator=g)
    labels = torch.randint(0, V, (3, 11), generator=g)
    labels[0, :4] = IGNORE_INDEX  # a prompt
    labels[2, 7:] = IGNORE_INDEX  # padding
    return {"input_ids": ids, "labels": labels}


@pytest.mark.parametrize("divergence,temperature,alpha,beta", [
    ("forward_kl", 1.0, 0.5, 0.5), ("forward_kl", 2.5, 0.3, 0.5), ("forward_kl", 4.0, 1.0, 0.5),
    ("reverse_kl", 2.0, 0.0, 0.5), ("jsd", 2.0, 0.8, 0.2),
])
def test_trained_loss_and_gradients_are_the_formula(tmp_path, divergence, temperature, alpha, beta):
    loss = DistillConfig(temperature=temperature, divergence=divergence, jsd_beta=beta, alpha=alpha)
    trainer = _trainer(tmp_path, loss=loss)
    trainer._build()
    trainer.model.train()
    batch = _batch()
    num_targets = trainer._check_batch(batch, "test")
    assert num_targets == 33 - 4 - 4
    ours = trainer._loss_sum(batch, num_targets) / num_targets
    ours.backward()
    got = {n: p.grad.clone() for n, p in trainer.model.named_parameters()}
    trainer.model.zero_grad(set_to_none=True)
    # the oracle: float64 copies of both models, full logits
    teacher64, student64 = (Model(c).double() for c in (TEACHER, STUDENT))
    teacher64.load_state_dict(trainer.teacher.state_dict())
    student64.load_state_dict(trainer.model.state_dict())
    expected = _hand_loss(teacher64, student64, batch["input_ids"], batch["labels"], temperature=temperature,
                          alpha=alpha, divergence=divergence, beta=beta)
    expected.backward()
    assert ours.dtype == torch.float32 and expected.item() > 0.05
    assert math.isclose(ours.item(), expected.item(), rel_tol=2e-5, abs_tol=1e-6)
    for name, p in student64.named_parameters():
        scale = p.grad.abs().max().item()
        assert (got[name].double() - p.grad).abs().max().item() <= 1e-4 * scale + 1e-7, name
    assert all(p.grad is None and not p.requires_grad for p in trainer.teacher.parameters())


def test_soft_capped_teacher_and_student_train_on_the_capped_formula(tmp_path):
    """Gemma 2 style heads (logits ← c·tanh(logits / c)) on both sides: the fused loss applies
    each model's cap; loss and gradients are the formula on the models' own (capped) logits."""
    teacher_cfg = ModelConfig(**{**TEACHER.__dict__, "final_softcap": 5.0})
    student_cfg = ModelConfig(**{**STUDENT.__dict__, "final_softcap": 2.0})
    torch.manual_seed(0)
    teacher = Model(teacher_cfg)
    with torch.no_grad():
        teacher.lm_head.weight.mul_(40)
    torch.manual_seed(1)
    student = Model(student_cfg)
    with torch.no_grad():  # logits of several units: the student's cap bends them
        student.lm_head.weight.mul_(20)
    trainer = _trainer(tmp_path, models=(teacher, student), loss=DistillConfig(temperature=2.0, alpha=0.6))
    trainer._build()
    trainer.model.train()
    batch = _batch()
    num_targets = trainer._check_batch(batch, "test")
    ours = trainer._loss_sum(batch, num_targets) / num_targets
    ours.backward()
    got = {n: p.grad.clone() for n, p in trainer.model.named_parameters()}
    teacher64, student64 = Model(teacher_cfg).double(), Model(student_cfg).double()
    teacher64.load_state_dict(trainer.teacher.state_dict())
    student64.load_state_dict(trainer.model.state_dict())
    expected = _hand_loss(teacher64, student64, batch["input_ids"], batch["labels"], temperature=2.0, alpha=0.6,
                          divergence="forward_kl")
    expected.backward()
    uncapped = Model(STUDENT).double()
    uncapped.load_state_dict(trainer.model.state_dict())
    assert not math.isclose(expected.item(), _hand_loss(teacher64, uncapped, batch["input_ids"], batch["labels"],
                                                        temperature=2.0, alpha=0.6, divergence="forward_kl").item(),
                            rel_tol=1e-3)  # the caps matter
    assert math.isclose(ours.item(), expected.item(), rel_tol=2e-5, abs_tol=1e-6)
    for name, p in student64.named_parameters():
        scale = p.grad.abs().max().item()
        assert (got[name].double() - p.grad).abs().max().item() <= 1e-4 * scale + 1e-7, name


def test_ignored_positions_take_no_part(tmp_path):
    trainer = _trainer(tmp_path, loss=DistillConfig(temperature=2.0, alpha=0.5))
    trainer._build()
    trainer.model.train()
    batch = _batch()
    one = {"input_ids": batch["input_ids"], "labels": torch.full_like(batch["labels"], IGNORE_INDEX)}
    one["labels"][1, 5] = batch["labels"][1, 5]
    alone = trainer._loss_sum(one, 1)  # one target: that token's term alone
    full = _hand_loss(trainer.teacher, trainer.model, batch["input_ids"], one["labels"], temperature=2.0, alpha=0.5,
                      divergence="forward_kl")
    assert math.isclose(alone.item(), full.item(), rel_tol=1e-4)
    none = {"input_ids": batch["input_ids"], "labels": torch.full_like(batch["labels"], IGNORE_INDEX)}
    zero = trainer._loss_sum(none, 0)
    assert zero.item() == 0.0 and zero.requires_grad


def test_student_learns_toward_the_teacher_and_the_teacher_is_untouched(tmp_path):
    teacher, student = _models()
    before_teacher = {k: v.clone() for k, v in teacher.state_dict().items()}
    before_student = {k: v.clone() for k, v in student.state_dict().items()}
    batch = {"input_ids": _stream()[:64].view(4, 16)}

    def kl_to_teacher():
        with torch.no_grad():
            pt = F.log_softmax(teacher(batch["input_ids"]), -1)
            ps = F.log_softmax(student(batch["input_ids"]), -1)
        return (pt.exp() * (pt - ps)).sum(-1).mean().item()

    start = kl_to_teacher()
    trainer = _trainer(tmp_path, steps=12, loss=DistillConfig(temperature=1.0, alpha=1.0), models=(teacher, student))
    result = trainer.fit()
    assert result.losses[-1] < 0.7 * result.losses[0]
    assert kl_to_teacher() < 0.7 * start
    assert all(torch.equal(before_teacher[k], v) for k, v in teacher.state_dict().items())
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    assert any(not torch.equal(before_student[k], v) for k, v in student.state_dict().items())


def test_bf16_autocast_runs_teacher_and_student_in_bf16(tmp_path):
    losses = {}
    for precision in ("fp32", "bf16"):
        trainer = _trainer(tmp_path / precision, precision=precision)
        trainer._build()
        trainer.model.train()
        seen = []
        hook = trainer.teacher.layers[0].attn.qkv_proj.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
        batch = _batch()
        losses[precision] = (trainer._loss_sum(batch, 25) / 25).item()
        hook.remove()
        assert seen == [torch.bfloat16 if precision == "bf16" else torch.float32]  # the teacher's matmuls
    assert math.isfinite(losses["bf16"]) and math.isclose(losses["bf16"], losses["fp32"], rel_tol=0.05)


def test_validation_is_the_students_cross_entropy(tmp_path):
    trainer = _trainer(tmp_path, steps=2, loss=DistillConfig(temperature=3.0, alpha=0.9))
    result = trainer.fit()
    totals, count = 0.0, 0
    with torch.no_grad():
        for i in range(2):
            b = trainer.val_source.batch(i)
            logits = trainer.model(b["input_ids"])
            totals += F.cross_entropy(logits.flatten(0, 1), b["labels"].flatten(), reduction="sum").item()
            count += b["labels"].numel()
    assert math.isclose(result.val_loss, totals / count, rel_tol=1e-5)
    last = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[-1])
    assert math.isclose(last["val_perplexity"], math.exp(totals / count), rel_tol=1e-5)


def test_resume_continues_exactly(tmp_path):
    loss = DistillConfig(temperature=2.0, divergence="jsd", jsd_beta=0.3, alpha=0.7)
    straight = _trainer(tmp_path / "a", steps=6, loss=loss).fit().losses
    _trainer(tmp_path / "b", steps=6, loss=loss, save_every=2).fit(stop_at=3)
    resumed = _trainer(tmp_path / "b", steps=6, loss=loss, save_every=2).fit(resume=True)
    assert resumed.start_step == 3
    assert resumed.losses == straight[3:]  # bit-identical on CPU
    logged = [json.loads(x)["loss"] for x in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert logged == straight


def test_mismatched_pairs_are_refused():
    teacher, student = _models()
    with pytest.raises(ValueError, match="teacher's vocabulary has 40 ids and the student's 41"):
        check_compatible(teacher, Model(ModelConfig(**{**STUDENT.__dict__, "vocab_size": 41})))
    with pytest.raises(ValueError, match="eos_token_id is 1 in the teacher's config.json and 2"):
        check_compatible(Model(ModelConfig(**{**TEACHER.__dict__, "eos_token_id": 1})),
                         Model(ModelConfig(**{**STUDENT.__dict__, "eos_token_id": 2})))
    with pytest.raises(ValueError, match="vocabulary has 40 ids"):
        DistillTrainer(Model(ModelConfig(**{**STUDENT.__dict__, "vocab_size": 41})), teacher,
                       PackedSource(_stream(), seq_len=16, batch_size=4), TrainerConfig(device="cpu"))
    with pytest.raises(ValueError, match="fsdp"):
        DistillTrainer(student, teacher, PackedSource(_stream(), seq_len=16, batch_size=4),
                       TrainerConfig(device="cpu", fsdp=True))


def test_tokenizers_are_compared():
    text_a = "def add(a, b):\n    return a + b\n" * 30
    text_b = "the quick brown fox jumps over the lazy dog\n" * 30
    a, a_again, b = (HFTokenizer.train_bpe([t], vocab_size=266) for t in (text_a, text_a, text_b))
    for tok in (a, b):
        assert tok.vocab_size == 266  # the same size: only their contents differ
    teacher = Model(ModelConfig(**{**TEACHER.__dict__, "vocab_size": 266}))
    student = Model(ModelConfig(**{**STUDENT.__dict__, "vocab_size": 266}))
    check_compatible(teacher, student, a, a_again)  # the same tokenizer trained twice
    with pytest.raises(ValueError, match="tokenizers differ in their tokenizer.json 'model' section.*first difference"):
        check_compatible(teacher, student, a, b)


def test_config_checks():
    with pytest.raises(ValueError, match="divergence must be one of forward_kl"):
        DistillConfig(divergence="kl")
    with pytest.raises(ValueError, match="temperature must be > 0"):
        DistillConfig(temperature=0.0)
    with pytest.raises(ValueError, match="alpha must be in"):
        DistillConfig(alpha=1.5)
    for beta in (-0.1, 0.0, 1.0):
        with pytest.raises(ValueError, match=r"jsd_beta must be in \(0, 1\)"):
            DistillConfig(jsd_beta=beta)


@pytest.mark.parametrize("divergence,trl_beta", [("forward_kl", 0.0), ("reverse_kl", 1.0), ("jsd", 0.3)])
def test_soft_target_loss_equals_trl_gkd_times_t_squared(tmp_path, monkeypatch, divergence, trl_beta):
    """α = 1: the trained loss is T² × TRL's GKDTrainer.generalized_jsd_loss on the full logits
    (β = 0 and 1 are TRL's forward and reverse KL), and so are the student's gradients."""
    monkeypatch.setenv("TRL_EXPERIMENTAL_SILENCE", "1")
    gkd = pytest.importorskip("trl.experimental.gkd")
    temperature = 2.0
    loss = DistillConfig(temperature=temperature, divergence=divergence, jsd_beta=trl_beta if divergence == "jsd"
                         else 0.5, alpha=1.0)
    trainer = _trainer(tmp_path, loss=loss)
    trainer._build()
    trainer.model.train()
    batch = _batch()
    ours = trainer._loss_sum(batch, 25) / 25
    ours.backward()
    got = {n: p.grad.clone() for n, p in trainer.model.named_parameters()}
    trainer.model.zero_grad(set_to_none=True)
    with torch.no_grad():
        teacher_logits = trainer.teacher(batch["input_ids"])
    theirs = temperature**2 * gkd.GKDTrainer.generalized_jsd_loss(
        trainer.model(batch["input_ids"]), teacher_logits, batch["labels"], beta=trl_beta, temperature=temperature)
    theirs.backward()
    assert math.isclose(ours.item(), theirs.item(), rel_tol=1e-5)
    for name, p in trainer.model.named_parameters():
        assert torch.allclose(got[name], p.grad, rtol=1e-4, atol=1e-4 * p.grad.abs().max().item()), name


def test_one_host_read_per_distillation_step(tmp_path):
    from tests.host_reads import HostReads

    trainer = _trainer(tmp_path, grad_accum=2)
    trainer._build()
    trainer.model.train()
    reads = []
    for step in range(2):
        batches = trainer._fetch(step)  # the data boundary: host batches checked on the host
        with HostReads() as counter:
            loss, grad_norm, _ = trainer._run_step(step, batches)
        reads.append(counter.where)
        assert math.isfinite(loss) and math.isfinite(grad_norm)
    assert all(len(r) == 1 for r in reads), reads  # the step's summary, as the base trainer
