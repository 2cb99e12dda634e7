"""Errors that reach a user.

``UserError`` is for bad input (a misspelt key, a missing file, a malformed store): the
CLI prints its message as one paragraph and exits with code 2, without a traceback.
``assert`` stays reserved for internal invariants.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class UserError(Exception):
    """Bad input from the user; the message says what was wrong and how to fix it."""


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    """A suffix for error messages: ' Did you mean 'x'?' or '' when nothing is close."""
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f" Did you mean '{close[0]}'?" if close else ""


def choose(kind: str, name: str, choices: Iterable[str]) -> str:
    """Return ``name`` if it is one of ``choices``; otherwise raise a UserError listing them."""
    options = sorted(choices)
    if name in options:
        return name
    raise UserError(
        f"Unknown {kind} '{name}'.{did_you_mean(name, options)} Valid choices: {', '.join(options)}."
    )


def reject_unknown_options(who: str, given: Iterable[str], known: Iterable[str]) -> None:
    """Raise a UserError for the first of ``given`` not in ``known``: "<who> got an unknown option 'x'"."""
    valid = sorted(known)
    for key in given:
        if key not in valid:
            raise UserError(
                f"{who} got an unknown option {key!r}.{did_you_mean(key, valid)} Valid options: {', '.join(valid)}."
            )
