"""How an error names a setting: by its Python parameter name (``max_steps``) from the API, by
the flag the user typed (``--max-steps``) from the ``fastlm`` command.

The command line runs its work inside :func:`command_line_names`; library code builds its
messages with :func:`shown`, so one check serves both without translating messages afterwards.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from contextvars import ContextVar

_FLAGS: ContextVar[dict[str, str] | None] = ContextVar("fastlm_flag_names", default=None)


def shown(name: str) -> str:
    """``name`` as the user wrote it: ``--max-steps`` under the command line, else ``max_steps``."""
    flags = _FLAGS.get()
    if flags is None:
        return name
    return flags.get(name, "--" + name.replace("_", "-"))


@contextlib.contextmanager
def command_line_names(overrides: dict[str, str] | None = None) -> Iterator[None]:
    """Within this block, :func:`shown` gives flags (``overrides`` maps names to other flags)."""
    token = _FLAGS.set(dict(overrides or {}))
    try:
        yield
    finally:
        _FLAGS.reset(token)
