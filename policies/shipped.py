"""Checkpoints that ship with dreamrt, named ``shipped:<name>`` where a checkpoint path is expected.

``shipped_checkpoint(name)`` finds ``checkpoints/<name>`` wherever this installation keeps it:

- inside the ``dreamrt`` package (package data of an installed wheel: ``dreamrt/checkpoints/<name>``),
  or in a ``dreamrt.checkpoints`` package when one is installed;
- next to the package folders of a source checkout (``<repo>/checkpoints/<name>``: the
  ``dreamrt`` package is ``<repo>/base``).

``resolve_policy_path(path)`` turns ``shipped:<name>`` into that directory and leaves any
other path alone, so a config default can name a shipped checkpoint without knowing where
the package was installed. Nothing here imports torch.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from dreamrt.errors import UserError

PREFIX = "shipped:"
CHECKPOINTS_DIR = "checkpoints"


def shipped_path(name: str) -> str:
    """The ``shipped:<name>`` spelling of a shipped checkpoint (what configs store)."""
    return f"{PREFIX}{name}"


def candidate_dirs() -> list[Path]:
    """Where shipped checkpoints may live, in search order (existing or not)."""
    import dreamrt

    package = Path(dreamrt.__file__).resolve().parent
    dirs = [package / CHECKPOINTS_DIR]
    try:
        spec = importlib.util.find_spec(f"dreamrt.{CHECKPOINTS_DIR}")
    except (ImportError, ValueError):
        spec = None
    if spec is not None and spec.submodule_search_locations:
        dirs += [Path(p) for p in spec.submodule_search_locations]
    dirs.append(package.parent / CHECKPOINTS_DIR)  # a source checkout: <repo>/base is the package
    unique: list[Path] = []
    for d in dirs:
        if d not in unique:
            unique.append(d)
    return unique


def shipped_checkpoint(name: str) -> Path:
    """The directory of the shipped checkpoint ``name``; a UserError naming ``policy.path=DIR`` if absent."""
    if not name or "/" in name or "\\" in name or name in (".", ".."):
        raise UserError(
            f"Shipped checkpoint name {name!r} is not a plain name; expected e.g. '{PREFIX}dpt_state_cm'."
        )
    searched = candidate_dirs()
    for d in searched:
        if (d / name).is_dir():
            return d / name
    available = sorted({p.name for d in searched if d.is_dir() for p in d.iterdir() if p.is_dir()})
    raise UserError(
        f"The shipped checkpoint '{name}' is not in this installation (looked in "
        f"{', '.join(str(d) for d in searched)}"
        f"{'; shipped here: ' + ', '.join(available) if available else ''}). "
        "Pass a checkpoint directory instead with policy.path=DIR (a `dreamrt train` or `dreamrt distill` run), "
        "or policy=expert for the scripted expert."
    )


def resolve_policy_path(path: str | None) -> str | None:
    """``shipped:<name>`` -> the shipped checkpoint's directory; any other value unchanged."""
    if path is not None and path.startswith(PREFIX):
        return str(shipped_checkpoint(path[len(PREFIX) :]))
    return path
