"""``--config FILE`` of the training commands: option values from TOML (or YAML), checked against
each option's type with errors that name the file's key (``max_steps in run.toml must be an
integer``), used as defaults that the command line overrides."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any


def load_config_file(path: str) -> dict[str, Any]:
    """Option values from a TOML file (or YAML when PyYAML is installed); keys may use - or _."""
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"--config {path}: no such file")
    if file.suffix == ".toml":
        import tomllib

        try:
            with open(file, "rb") as f:
                values = tomllib.load(f)
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
            raise ValueError(f"--config {path} is not valid TOML ({err})") from None
    elif file.suffix in (".yaml", ".yml"):
        try:
            import yaml
        except ImportError:
            raise ValueError("--config: reading YAML needs PyYAML (pip install pyyaml); or use a .toml file") from None
        try:
            values = yaml.safe_load(file.read_text(encoding="utf-8")) or {}
        except (yaml.YAMLError, UnicodeDecodeError) as err:
            raise ValueError(f"--config {path} is not valid YAML ({' '.join(str(err).split())})") from None
    else:
        raise ValueError(f"--config must be a .toml, .yaml or .yml file, got {path}")
    if not isinstance(values, dict):
        raise ValueError(f"--config {path} must hold a table of option values")
    return {key.replace("-", "_"): value for key, value in values.items()}


def _file_value(action: argparse.Action, key: str, value: Any, path: str) -> Any:
    """A config-file value checked against its option's type, the error naming the file's key."""
    where = f"{key} in {path}"
    if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):  # noqa: SLF001
        if not isinstance(value, bool):
            raise ValueError(f"{where} must be true or false, got {value!r}")
        return value if isinstance(action, argparse._StoreTrueAction) else value  # noqa: SLF001
    if action.nargs in ("+", "*"):
        value = value if isinstance(value, list) else [value]
        if not all(isinstance(v, (str, int, float)) and not isinstance(v, bool) for v in value):
            raise ValueError(f"{where} must be a list of values, got {value!r}")
        return [str(v) for v in value] if action.type in (None, str) else value
    kind = action.type or str
    if kind is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise ValueError(f"{where} must be an integer, got {value!r}")
    if kind is float and (isinstance(value, bool) or not isinstance(value, (int, float))):
        raise ValueError(f"{where} must be a number, got {value!r}")
    if kind is str and not isinstance(value, str):
        raise ValueError(f"{where} must be a string, got {value!r}")
    if action.choices is not None and value not in action.choices:
        raise ValueError(f"{where} must be one of {', '.join(map(str, action.choices))}, got {value!r}")
    return float(value) if kind is float else value


def parse(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """Parse once for --config, use the file's values as defaults, then parse again. Records in
    ``args.from_file`` the keys whose value came from the file (for error messages)."""
    args = parser.parse_args(argv)
    args.from_file = {}
    if getattr(args, "config", None):
        values = load_config_file(args.config)
        subparser = parser._subparsers._group_actions[0].choices[args.command]  # noqa: SLF001
        actions = {a.dest: a for a in subparser._actions if a.option_strings}  # noqa: SLF001
        unknown = sorted(k for k in values if k not in actions or k in ("config", "help"))
        if unknown:
            raise ValueError(f"unknown option(s) in --config {args.config}: {', '.join(unknown)}")
        checked = {k: _file_value(actions[k], k, v, args.config) for k, v in values.items()}
        subparser.set_defaults(**checked)
        args = parser.parse_args(argv)
        given = set(argv or sys.argv[1:])
        args.from_file = {k: f"{k} in {args.config}" for k in checked
                          if not any(o in given or any(g.startswith(o + "=") for g in given)
                                     for o in actions[k].option_strings)}
    return args
