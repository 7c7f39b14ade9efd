"""Evaluation: perplexity (ROUGE and BLEU come with the evaluation issue)."""

from fastlm.eval.perplexity import evaluate_loss, perplexity

__all__ = ["evaluate_loss", "perplexity"]
