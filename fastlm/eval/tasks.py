"""Evaluation tasks from local files (nothing is downloaded).

A task is a **jsonl** file of examples, or a **YAML/JSON** file describing one (YAML needs
PyYAML; without it use .json or .jsonl). Three kinds, told apart by ``type`` or, in a jsonl
file, by the fields of its first example:

- ``generate``: ``prompt`` and ``references`` (a string or a list of strings) per example; the
  completion (fastlm.generate, cut at the ``stop`` strings) is scored with ``metrics`` from
  rouge, bleu (BLEU and chrF), exact_match, f1 (default: exact_match, f1).
- ``multiple_choice``: ``context``, ``choices`` (list of strings) and ``gold`` (index, or the
  right choice's text); metrics acc and acc_norm as lm-evaluation-harness defines them.
- ``perplexity``: ``text`` per example (or ``data`` naming text files, folders or jsonl);
  metrics perplexity, bits_per_byte, nll (strided sliding window: ``window``, ``stride``).

Description keys (all optional but ``type`` and a data source)::

    name: qa                      # default: the file name without suffix
    type: generate                # generate | multiple_choice | perplexity
    data: qa.jsonl                # path(s) relative to this file; or `examples:` inline
    template: "Q: {prompt}\\nA:"   # str.format over the example's fields
    fewshot: 2                    # the first 2 of fewshot_data / fewshot_examples, shown first
    fewshot_data: train.jsonl
    fewshot_separator: "\\n\\n"
    target_delimiter: " "         # between a prompt and its answer (few-shot and choices)
    metrics: [rouge, bleu, exact_match, f1]
    use_stemmer: false            # rouge-score's Porter stemmer
    stop: ["\\n"]                  # stop strings of generation
    max_new_tokens: 32
    do_sample: false              # with temperature, top_k, top_p, seed
    chat: false                   # wrap the prompt with the tokenizer's chat template
    system: null                  # system message when chat is on
    window: null                  # perplexity: tokens per window (default: model context)
    stride: null                  #             tokens between windows (default: window)

The prompt of an example is fewshot_separator.join(shot_1, ..., shot_k, template(example)),
with shot_i = template(example_i) + target_delimiter + its answer (first reference, or the
gold choice). Every error names the file and the line.
"""

from __future__ import annotations

import json
import string
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastlm.eval import metrics as metric_fns

KINDS = {
    "generate": ("prompt", "references"),
    "multiple_choice": ("context", "choices", "gold"),
    "perplexity": ("text",),
}
KIND_METRICS = {
    "generate": tuple(metric_fns.METRICS),
    "multiple_choice": ("acc", "acc_norm"),
    "perplexity": ("perplexity", "bits_per_byte", "nll"),
}
DEFAULT_METRICS = {"generate": ("exact_match", "f1"), "multiple_choice": ("acc", "acc_norm"),
                   "perplexity": ("perplexity", "bits_per_byte")}
DEFAULT_TEMPLATE = {"generate": "{prompt}", "multiple_choice": "{context}", "perplexity": "{text}"}
OPTIONS = {  # key: (type(s), default)
    "name": (str, None), "type": (str, None), "data": ((str, list), None), "examples": (list, None),
    "template": (str, None), "fewshot": (int, 0), "fewshot_data": (str, None), "fewshot_examples": (list, None),
    "fewshot_separator": (str, "\n\n"), "target_delimiter": (str, " "), "metrics": (list, None),
    "use_stemmer": (bool, False), "stop": (list, []), "max_new_tokens": (int, 32), "do_sample": (bool, False),
    "temperature": ((int, float), 1.0), "top_k": (int, None), "top_p": ((int, float), None), "seed": (int, None),
    "chat": (bool, False), "system": (str, None), "window": (int, None), "stride": (int, None),
}


class TaskError(ValueError):
    """A task file that cannot be used; the message starts with ``file:line:``."""


@dataclass
class Example:
    fields: dict[str, Any]
    source: str  # "file:line" of the example


@dataclass
class Task:
    """A loaded task: its kind, examples, few-shot examples and options (module docstring)."""

    name: str
    kind: str
    path: str
    examples: list[Example]
    fewshot_examples: list[Example] = field(default_factory=list)
    options: dict[str, Any] = field(default_factory=dict)
    metrics: tuple[str, ...] = ()
    template_source: str = ""  # "file:line" of the template option

    def option(self, key: str):
        return self.options.get(key, OPTIONS[key][1])

    def answer(self, example: Example) -> str:
        """The text that follows a few-shot example: its first reference or its gold choice."""
        f = example.fields
        if self.kind == "generate":
            return f["references"][0]
        return f["choices"][f["gold"]]

    def render(self, example: Example) -> str:
        template = self.option("template") or DEFAULT_TEMPLATE[self.kind]
        try:
            return string.Formatter().vformat(template, (), example.fields)
        except KeyError as err:
            raise TaskError(f"{self.template_source or self.path}: the template {template!r} uses field "
                            f"{err.args[0]!r}, which the example at {example.source} lacks "
                            f"(fields: {', '.join(example.fields)})") from None
        except (IndexError, ValueError) as err:
            raise TaskError(f"{self.template_source or self.path}: cannot fill the template {template!r} with "
                            f"the example at {example.source}: {err}") from None

    def prompt(self, example: Example) -> str:
        shots = [self.render(s) + self.option("target_delimiter") + self.answer(s)
                 for s in self.fewshot_examples[: self.option("fewshot")]]
        return self.option("fewshot_separator").join(shots + [self.render(example)])


# --------------------------------------------------------------------------- reading files


def _key_lines(text: str, suffix: str) -> dict[str, int]:
    """Line (1-based) of each top-level key of a YAML or JSON description."""
    lines: dict[str, int] = {}
    if suffix in (".yaml", ".yml"):
        import yaml

        node = yaml.compose(text)
        if isinstance(node, yaml.MappingNode):
            for key, value in node.value:
                lines[str(key.value)] = key.start_mark.line + 1
                if isinstance(value, yaml.SequenceNode):  # list items: "metrics[1]"
                    for i, item in enumerate(value.value):
                        lines[f"{key.value}[{i}]"] = item.start_mark.line + 1
        return lines
    for number, line in enumerate(text.splitlines(), 1):
        stripped = line.strip()
        if stripped.startswith('"'):
            key = stripped[1:].split('"', 1)[0]
            lines.setdefault(key, number)
    return lines


def _read_description(path: Path) -> tuple[dict[str, Any], dict[str, int]]:
    text = path.read_text(encoding="utf-8")
    if path.suffix in (".yaml", ".yml"):
        try:
            import yaml
        except ImportError:
            raise TaskError(f"{path}:1: reading a YAML task needs PyYAML (pip install pyyaml); "
                            "or write the task as .json or .jsonl") from None
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as err:
            mark = getattr(err, "problem_mark", None)
            raise TaskError(f"{path}:{mark.line + 1 if mark else 1}: not valid YAML: {err}") from None
    else:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise TaskError(f"{path}:{err.lineno}: not valid JSON: {err.msg}") from None
    if not isinstance(data, dict):
        raise TaskError(f"{path}:1: a task description must be a mapping of options, got {type(data).__name__}")
    return data, _key_lines(text, path.suffix)


def _read_jsonl(path: Path) -> list[Example]:
    if not path.is_file():
        raise FileNotFoundError(f"task data file not found: {path}")
    examples = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                value = json.loads(line)
            except json.JSONDecodeError as err:
                raise TaskError(f"{path}:{number}: not valid JSON: {err.msg}") from None
            if not isinstance(value, dict):
                raise TaskError(f"{path}:{number}: each line must be a JSON object, got {type(value).__name__}")
            examples.append(Example(value, f"{path}:{number}"))
    return examples


def _infer_kind(examples: list[Example], path: Path) -> str:
    if not examples:
        raise TaskError(f"{path}:1: the task has no examples")
    keys = set(examples[0].fields)
    for kind, needed in KINDS.items():
        if set(needed) <= keys:
            return kind
    wanted = "; ".join(f"{k}: {', '.join(v)}" for k, v in KINDS.items())
    raise TaskError(f"{examples[0].source}: cannot tell the task type from the fields {sorted(keys)}; "
                    f"expected one of — {wanted}")


def _check_example(kind: str, example: Example) -> None:
    """Validate (and normalise: references to a list, gold to an index) one example in place."""
    f, where = example.fields, example.source
    missing = [k for k in KINDS[kind] if k not in f]
    if missing:
        raise TaskError(f"{where}: missing field {missing[0]!r} (a {kind} example needs "
                        f"{', '.join(KINDS[kind])})")
    if kind == "generate":
        refs = [f["references"]] if isinstance(f["references"], str) else f["references"]
        if not isinstance(f["prompt"], str):
            raise TaskError(f"{where}: 'prompt' must be a string")
        if not isinstance(refs, list) or not refs or not all(isinstance(r, str) for r in refs):
            raise TaskError(f"{where}: 'references' must be a string or a non-empty list of strings")
        f["references"] = refs
    elif kind == "multiple_choice":
        choices, gold = f["choices"], f["gold"]
        if not isinstance(f["context"], str):
            raise TaskError(f"{where}: 'context' must be a string")
        if not isinstance(choices, list) or not choices or not all(isinstance(c, str) for c in choices):
            raise TaskError(f"{where}: 'choices' must be a non-empty list of strings")
        if isinstance(gold, str):
            if gold not in choices:
                raise TaskError(f"{where}: 'gold' {gold!r} is not one of the choices")
            f["gold"] = choices.index(gold)
        elif isinstance(gold, bool) or not isinstance(gold, int) or not 0 <= gold < len(choices):
            raise TaskError(f"{where}: 'gold' must be a choice index in [0, {len(choices)}) or a choice's text, "
                            f"got {gold!r}")
    elif not isinstance(f["text"], str):
        raise TaskError(f"{where}: 'text' must be a string")


def _inline(values: list, path: Path, line: int) -> list[Example]:
    out = []
    for i, value in enumerate(values):
        if not isinstance(value, dict):
            raise TaskError(f"{path}:{line}: example {i} must be a mapping of fields")
        out.append(Example(dict(value), f"{path}:{line} (example {i})"))
    return out


def load_task(path: str | Path) -> Task:
    """Read and validate a task file (module docstring); errors name the file and line."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"task file not found: {path}")
    if path.suffix == ".jsonl":
        examples = _read_jsonl(path)
        kind = _infer_kind(examples, path)
        for example in examples:
            _check_example(kind, example)
        return Task(path.stem, kind, str(path), examples, metrics=DEFAULT_METRICS[kind])
    if path.suffix not in (".yaml", ".yml", ".json"):
        raise TaskError(f"{path}:1: a task file must be .jsonl, .yaml, .yml or .json")
    options, lines = _read_description(path)

    def where(key: str, index: int | None = None) -> str:
        line = lines.get(f"{key}[{index}]") if index is not None else None
        return f"{path}:{line or lines.get(key, 1)}"

    for key, value in options.items():
        if key not in OPTIONS:
            raise TaskError(f"{where(key)}: unknown task option {key!r}; known: {', '.join(OPTIONS)}")
        kinds = OPTIONS[key][0]
        if value is not None and (not isinstance(value, kinds) or isinstance(value, bool) and kinds is int):
            raise TaskError(f"{where(key)}: option {key!r} has the wrong type ({type(value).__name__})")
    base = path.parent
    if options.get("examples") is not None:
        examples = _inline(options["examples"], path, lines.get("examples", 1))
    elif options.get("data") is not None:
        data = options["data"]
        files = [data] if isinstance(data, str) else data
        if options.get("type") == "perplexity" and not all(str(f).endswith(".jsonl") for f in files):
            from fastlm.data import read_texts

            texts = read_texts([base / f for f in files])
            examples = [Example({"text": t}, f"{where('data')} (document {i})") for i, t in enumerate(texts)]
        else:
            examples = [e for f in files for e in _read_jsonl(base / f)]
    else:
        raise TaskError(f"{path}:1: missing field 'data' (or 'examples'): where are the task's examples?")
    kind = options.get("type") or _infer_kind(examples, path)
    if kind not in KINDS:
        raise TaskError(f"{where('type')}: unknown task type {kind!r}; choose from {', '.join(KINDS)}")
    for example in examples:
        _check_example(kind, example)
    shots: list[Example] = []
    if options.get("fewshot_examples") is not None:
        shots = _inline(options["fewshot_examples"], path, lines.get("fewshot_examples", 1))
    elif options.get("fewshot_data"):
        shots = _read_jsonl(base / options["fewshot_data"])
    for example in shots:
        _check_example(kind, example)
    fewshot = options.get("fewshot", 0)
    if fewshot < 0 or fewshot > len(shots):
        raise TaskError(f"{where('fewshot')}: fewshot={fewshot} but {len(shots)} few-shot examples are given "
                        "(fewshot_data or fewshot_examples)")
    metrics = tuple(options.get("metrics") or DEFAULT_METRICS[kind])
    for i, metric in enumerate(metrics):
        if metric not in KIND_METRICS[kind]:
            raise TaskError(f"{where('metrics', i)}: unknown metric {metric!r} for a {kind} task; "
                            f"choose from {', '.join(KIND_METRICS[kind])}")
    if not all(isinstance(s, str) and s for s in options.get("stop") or []):
        raise TaskError(f"{where('stop')}: 'stop' must be a list of non-empty strings")
    task = Task(options.get("name") or path.stem, kind, str(path), examples, shots, options, metrics,
                where("template"))
    for example in examples[:1] + shots[:1]:
        task.render(example)  # a template naming a missing field fails here, at load time
    return task


# --------------------------------------------------------------------------- running


@dataclass
class TaskResult:
    """Metrics of one task on one model, the per-example outputs and the work done."""

    task: str
    kind: str
    metrics: dict[str, float]
    outputs: list[dict[str, Any]]
    tokens_generated: int = 0
    tokens_scored: int = 0
    seconds: float = 0.0  # the whole task, metrics included
    model_seconds: float = 0.0  # generation or scoring only: the denominator of tokens/s


def evaluate_task(model, tokenizer, task: Task, *, batch_size: int = 16, progress: bool | None = None) -> TaskResult:
    """Run ``task`` on ``model``: generation + metrics, multiple-choice scoring or perplexity."""
    from fastlm.eval.perplexity import perplexity
    from fastlm.eval.scoring import generate_texts, multiple_choice

    start = time.perf_counter()
    if task.kind == "perplexity":
        out = perplexity(model, [e.fields["text"] for e in task.examples], tokenizer=tokenizer,
                         window=task.option("window"), stride=task.option("stride"), batch_size=batch_size,
                         progress=progress)
        seconds = time.perf_counter() - start
        return TaskResult(task.name, task.kind, {m: out[m] for m in task.metrics}, [], 0, out["tokens"], seconds,
                          seconds)
    if task.kind == "multiple_choice":
        examples = [(task.prompt(e), e.fields["choices"], e.fields["gold"]) for e in task.examples]
        stats: dict[str, int] = {}
        scores, per_example = multiple_choice(model, tokenizer, examples,
                                              target_delimiter=task.option("target_delimiter"),
                                              batch_size=batch_size, progress=progress, stats=stats)
        model_seconds = time.perf_counter() - start
        outputs = [{"prompt": task.render(e), "output": e.fields["choices"][r.pred],
                    "reference": e.fields["choices"][e.fields["gold"]], "correct": bool(r.acc)}
                   for e, r in zip(task.examples, per_example)]
        return TaskResult(task.name, task.kind, {m: scores[m] for m in task.metrics}, outputs, 0,
                          stats.get("tokens", 0), time.perf_counter() - start, model_seconds)
    prompts = [task.prompt(e) for e in task.examples]
    texts, generated = generate_texts(
        model, tokenizer, prompts, max_new_tokens=task.option("max_new_tokens"), stop=task.option("stop") or (),
        do_sample=task.option("do_sample"), temperature=task.option("temperature"), top_k=task.option("top_k"),
        top_p=task.option("top_p"), seed=task.option("seed"), chat=task.option("chat"), system=task.option("system"),
        batch_size=batch_size, progress=progress)
    model_seconds = time.perf_counter() - start
    references = [e.fields["references"] for e in task.examples]
    values: dict[str, float] = {}
    for metric in task.metrics:
        values.update(metric_fns.compute(metric, texts, references, use_stemmer=task.option("use_stemmer")))
    outputs = [{"prompt": task.render(e), "output": t, "reference": e.fields["references"][0]}
               for e, t in zip(task.examples, texts)]
    return TaskResult(task.name, task.kind, values, outputs, generated, 0, time.perf_counter() - start,
                      model_seconds)
