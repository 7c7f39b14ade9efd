"""fastlm benchmark suite: `python -m bench.run`."""
