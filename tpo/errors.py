"""How the commands report what is wrong with a config: one line, not a traceback.

``CONFIG_ERRORS`` are the types a config check raises (each message names the key,
the file or the sample); :func:`print_config_error` prints one as
``<command>: error: <message>`` and returns the exit status 2. Errors raised
while building what a config names, after its check (a model constructor's own
rules, weights that do not fit), are marked with :func:`mark_setup_error` so
that a command prints them the same way; any other error keeps its traceback.
"""
from __future__ import annotations

import sys

CONFIG_ERRORS = (KeyError, TypeError, ValueError, FileNotFoundError)
_SETUP = "tpo_setup_error"


def print_config_error(prog: str, err: BaseException) -> int:
    message = err.args[0] if isinstance(err, KeyError) and err.args else err  # KeyError's str() adds quotes
    print(f"{prog}: error: {message}", file=sys.stderr)
    return 2


def mark_setup_error(err: BaseException) -> None:
    setattr(err, _SETUP, True)


def is_setup_error(err: BaseException) -> bool:
    return bool(getattr(err, _SETUP, False))
