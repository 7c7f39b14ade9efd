"""The README's first Python snippet runs on a CPU-only machine (against a small run directory)."""

import re
from pathlib import Path

import fastlm
from fastlm.train import checkpoint as ckpt
from tests.cli.conftest import make_checkpoint

README = Path(fastlm.__file__).resolve().parents[1] / "README.md"


def test_first_python_snippet_runs(tmp_path, monkeypatch):
    snippet = re.search(r"```python\n(.*?)```", README.read_text(), re.S).group(1)
    assert 'latest_checkpoint("runs/demo")' in snippet and '"cuda" if torch.cuda.is_available()' in snippet
    step = make_checkpoint(tmp_path / "runs" / "demo" / "checkpoints" / "step-00000001")
    (step / ckpt.MARKER).write_text("1\n")
    monkeypatch.chdir(tmp_path)
    exec(compile(snippet, "README.md", "exec"), {})
    assert (tmp_path / "out" / "config.json").is_file()
