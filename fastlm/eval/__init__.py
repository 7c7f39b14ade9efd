"""Evaluation: perplexity, loglikelihood and multiple-choice accuracy, generation metrics (ROUGE,
BLEU/chrF, exact match, token F1), local task files, the ``fastlm eval`` report and an
lm-evaluation-harness backend (:mod:`fastlm.eval.harness`, imported only when asked for).

Scales: ROUGE, exact match, F1, acc and acc_norm are fractions in [0, 1]; BLEU and chrF are
sacrebleu's 0–100 scores. See :mod:`fastlm.eval.metrics`.
"""

from fastlm.eval.metrics import METRICS, bleu, exact_match, normalize_answer, rouge, token_f1
from fastlm.eval.perplexity import evaluate_loss, perplexity
from fastlm.eval.scoring import generate_texts, loglikelihood, loglikelihood_tokens, multiple_choice
from fastlm.eval.tasks import Task, TaskError, evaluate_task, load_task

__all__ = [
    "METRICS", "Task", "TaskError", "bleu", "evaluate_loss", "evaluate_task", "exact_match", "generate_texts",
    "load_task", "loglikelihood", "loglikelihood_tokens", "multiple_choice", "normalize_answer", "perplexity",
    "rouge", "token_f1",
]
