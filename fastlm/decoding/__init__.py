"""Decoding strategies behind :func:`fastlm.generate` (greedy/sampling, beam, contrastive, speculative)."""
