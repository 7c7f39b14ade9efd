"""Evidence that fastlm's alignment and distillation work: runs the three demos in turn.

- ``bench/align/demo_prefs.py``: SFT on the synthetic even-digits task, a reward model from noisy
  rankings (held-out pairwise accuracy), DPO (oracle reward and win rate before/after);
- ``bench/align/demo_rl.py``: PPO and GRPO on the oracle reward (reward up, KL bounded) and on a
  hackable proxy with the KL penalty off and on (the drift the KL term prevents);
- ``bench/align/demo_distill.py``: a teacher, then students trained with soft targets vs hard
  labels at the same steps (held-out perplexity, top-1 agreement with the teacher).

Each writes ``bench/results/align/<name>.{json,md}``. ``python bench/align_demo.py [--only prefs rl distill]``;
the demos run one after another as subprocesses (each with its own default options; several
minutes each on a 2-core CPU).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEMOS = ("prefs", "rl", "distill")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="+", choices=DEMOS, default=list(DEMOS), help="demos to run")
    args = parser.parse_args(argv)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    failed = []
    for name in args.only:
        start = time.perf_counter()
        result = subprocess.run([sys.executable, str(ROOT / "bench" / "align" / f"demo_{name}.py")], env=env)
        print(f"demo_{name}: exit {result.returncode} in {time.perf_counter() - start:.0f} s")
        if result.returncode:
            failed.append(name)
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
