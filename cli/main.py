"""The `dreamrt` command: parse the verb, compose the Hydra config, call the job.

    dreamrt <command> [positional ...] [key=value ...] [--json PATH] [--out DIR]

Every job is a Hydra config under ``configs/`` typed by a dataclass; overrides use Hydra's
syntax (``lr=3e-4``, ``policy=random``, ``policy.path=DIR``). User mistakes (a misspelt
key, a wrong type, a missing file) print one paragraph and exit with code 2.
"""

from __future__ import annotations

import datetime as _dt
import importlib
import json
import re
import sys
import textwrap
from pathlib import Path
from typing import Any

from dreamrt.cli.commands import COMMANDS, Command, by_name
from dreamrt.errors import UserError, did_you_mean
from dreamrt.jobs import JobResult

USAGE = "usage: dreamrt <command> [positional ...] [key=value ...] [--json PATH] [--out DIR] [--help]"
EXIT_USER_ERROR = 2


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        code = _dispatch(argv)
    except UserError as error:
        print(_paragraph(f"dreamrt: error: {error}"), file=sys.stderr)
        code = EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("dreamrt: interrupted", file=sys.stderr)
        code = 130
    except BrokenPipeError:
        # Output piped into `head` and the like: the reader left, nothing is wrong.
        sys.stdout = None
        code = 0
    return code


def _dispatch(argv: list[str]) -> int:
    command, rest = _match_command(argv)
    if command is None:
        print(_global_help())
        return 0
    if any(arg in ("-h", "--help") for arg in rest):
        print(command_help(command))
        return 0
    positionals, overrides, json_path, out_dir = _split_args(command, rest)
    overrides = _positional_overrides(command, positionals) + overrides
    cfg, resolved_yaml = compose(command, overrides)
    run_dir = None
    if command.writes_outputs:
        run_dir = Path(out_dir) if out_dir else _default_run_dir(command)
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(resolved_yaml)
        print(f"dreamrt: writing to {run_dir}", file=sys.stderr)
    result = _load(command.job)(cfg, run_dir)
    result = result if isinstance(result, JobResult) else JobResult()
    if json_path:
        _write_json(Path(json_path), result.summary)
    return result.exit_code


def _match_command(argv: list[str]) -> tuple[Command | None, list[str]]:
    table = by_name()
    for length in (2, 1):
        words = argv[:length]
        if len(words) == length and " ".join(words) in table:
            return table[" ".join(words)], argv[length:]
    if not argv or argv[0] in ("-h", "--help"):
        return None, []
    typed = " ".join(a for a in argv[:2] if not a.startswith("-") and "=" not in a)
    names = list(table)
    hint = did_you_mean(typed, names) or did_you_mean(argv[0], {n.split()[0] for n in names})
    raise UserError(f"Unknown command '{typed}'.{hint} Commands: {', '.join(names)}. Run `dreamrt --help`.")


def _split_args(command: Command, args: list[str]) -> tuple[list[str], list[str], str | None, str | None]:
    positionals: list[str] = []
    overrides: list[str] = []
    flags: dict[str, str | None] = {"--json": None, "--out": None}
    i = 0
    while i < len(args):
        arg = args[i]
        flag, _, inline = arg.partition("=")
        if flag in flags:
            if inline:
                flags[flag] = inline
            elif i + 1 < len(args):
                flags[flag] = args[i + 1]
                i += 1
            else:
                raise UserError(f"{flag} needs a value, e.g. `{flag} PATH`.")
        elif arg.startswith("-"):
            raise UserError(
                f"Unknown option '{arg}' for `dreamrt {command.name}`. Options: --json PATH, --out DIR, --help; "
                "config values are set as key=value."
            )
        elif "=" in arg:
            overrides.append(arg)
        else:
            positionals.append(arg)
        i += 1
    return positionals, overrides, flags["--json"], flags["--out"]


def _positional_overrides(command: Command, positionals: list[str]) -> list[str]:
    if len(positionals) > len(command.positional):
        extra = positionals[len(command.positional) :]
        expected = " ".join(p.upper() for p in command.positional) or "no positional arguments"
        raise UserError(
            f"Unexpected argument(s) {extra} for `dreamrt {command.name}`; it takes {expected}. "
            "Config values are set as key=value."
        )
    # Quote so that paths with Hydra-special characters (=, spaces, commas) survive parsing.
    return [f"{key}='{_escape(value)}'" for key, value in zip(command.positional, positionals)]


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("'", "\\'")


def compose(command: Command, overrides: list[str]) -> tuple[Any, str]:
    """Compose the command's config with overrides; return the typed config and its YAML."""
    from omegaconf import OmegaConf

    raw = _compose_raw(command, overrides)
    schema_cls = _load(command.schema)
    try:
        merged = OmegaConf.merge(OmegaConf.structured(schema_cls), raw)
        resolved_yaml = OmegaConf.to_yaml(merged, resolve=True)
        cfg = OmegaConf.to_object(merged)
    except (UserError, ValueError, TypeError, KeyError) as error:
        raise UserError(_explain_config_error(command, error)) from None
    except Exception as error:  # OmegaConf's own hierarchy
        if type(error).__module__.startswith("omegaconf"):
            raise UserError(_explain_config_error(command, error)) from None
        raise
    return cfg, resolved_yaml


def _compose_raw(command: Command, overrides: list[str]):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_module

    # Each yaml lists `<config>_schema` first in its defaults, so the dataclass types every key
    # (a misspelt key or a wrong type fails at composition) and supplies the defaults.
    from hydra.core.config_store import ConfigStore
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    ConfigStore.instance().store(name=f"{command.config}_schema", node=_load(command.schema))
    GlobalHydra.instance().clear()
    try:
        with initialize_config_module(config_module="dreamrt.configs", version_base="1.3"):
            return hydra_compose(config_name=command.config, overrides=overrides)
    except (HydraException, OmegaConfBaseException) as error:
        raise UserError(_explain_hydra_error(command, overrides, error)) from None


def _explain_hydra_error(command: Command, overrides: list[str], error: Exception) -> str:
    cause = error.__cause__
    if cause is not None and getattr(cause, "full_key", None) and "Could not override" not in str(error):
        return _explain_config_error(command, cause)
    message = str(error).strip()
    unknown = re.search(r"Could not override '([^']+)'", message) or re.search(
        r"Key '([^']+)' is not in struct", message
    )
    if unknown:
        key = unknown.group(1)
        valid = _valid_keys(command, key)
        return (
            f"`dreamrt {command.name}` has no config key '{key}'.{did_you_mean(key, valid)} "
            f"Valid keys here: {', '.join(valid)}. See `dreamrt {command.name} --help`."
        )
    bad_value = re.search(r"full_key: (\S+)", message)
    if bad_value:
        key = bad_value.group(1)
        reason = next(
            (line.strip() for line in message.splitlines() if "Value '" in line), message.splitlines()[0]
        )
        expected = _expected_type(command, key)
        return (
            f"Invalid value for '{key}' in `dreamrt {command.name}`: {reason}."
            f"{' Expected ' + expected + '.' if expected else ''}"
        )
    first_lines = " ".join(message.splitlines()[:6])
    return f"Invalid configuration for `dreamrt {command.name}` (overrides: {overrides}): {first_lines}"


def _valid_keys(command: Command, dotted_key: str) -> list[str]:
    from omegaconf import DictConfig, OmegaConf

    node = OmegaConf.structured(_load(command.schema))
    parent_path = dotted_key.rsplit(".", 1)[0] if "." in dotted_key else ""
    prefix = f"{parent_path}." if parent_path else ""
    if parent_path:
        node = OmegaConf.select(node, parent_path, default=None)
    if not isinstance(node, DictConfig):
        return []
    return sorted(prefix + str(k) for k in node.keys())


def _explain_config_error(command: Command, error: Exception) -> str:
    key = getattr(error, "full_key", None)
    message = getattr(error, "msg", None) or str(error)
    message = message.strip().splitlines()[0] if message.strip() else type(error).__name__
    if "missing mandatory value" in message.lower() and key:
        hint = f" Pass it as `{key}=...`"
        if key in command.positional:
            hint = (
                f" Pass it as the positional argument {key.upper()} (`dreamrt {command.name} {key.upper()}`)"
            )
        return f"`dreamrt {command.name}` needs a value for '{key}'.{hint}."
    if key:
        expected = _expected_type(command, key)
        return (
            f"Invalid value for '{key}' in `dreamrt {command.name}`: {message}."
            f"{' Expected ' + expected + '.' if expected else ''}"
        )
    return f"Invalid configuration for `dreamrt {command.name}`: {message}"


def _expected_type(command: Command, dotted_key: str) -> str | None:
    import dataclasses
    import typing

    cls = _load(command.schema)
    for part in dotted_key.split("."):
        if not dataclasses.is_dataclass(cls):
            return None
        hints = typing.get_type_hints(cls)
        if part not in hints:
            return None
        cls = hints[part]
    return getattr(cls, "__name__", None) or str(cls)


def _load(target: str):
    module_name, _, attr = target.partition(":")
    return getattr(importlib.import_module(module_name), attr)


def _default_run_dir(command: Command) -> Path:
    now = _dt.datetime.now()
    base = (
        Path("outputs")
        / now.strftime("%Y-%m-%d")
        / f"{now.strftime('%H-%M-%S')}_{command.name.replace(' ', '_')}"
    )
    candidate, n = base, 1
    while candidate.exists():
        candidate, n = base.with_name(f"{base.name}_{n}"), n + 1
    return candidate


def _write_json(path: Path, summary: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(summary, indent=2, default=_json_default) + "\n")


def _json_default(value: Any) -> Any:
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"cannot write {type(value).__name__} to JSON")


def command_help(command: Command) -> str:
    raw = _compose_raw(command, [])
    from omegaconf import OmegaConf

    merged = OmegaConf.merge(OmegaConf.structured(_load(command.schema)), raw)
    usage = " ".join(["dreamrt", command.name, *(p.upper() for p in command.positional), "[key=value ...]"])
    extras = "[--json PATH] [--out DIR]" if command.writes_outputs else "[--json PATH]"
    return "\n".join(
        [
            f"usage: {usage} {extras}",
            "",
            command.summary,
            "",
            f"Config (configs/{command.config}.yaml; override any key with key=value):",
            textwrap.indent(OmegaConf.to_yaml(merged).rstrip(), "  "),
        ]
    )


def _global_help() -> str:
    width = max(len(c.name) for c in COMMANDS)
    lines = [USAGE, "", "Commands:"]
    lines += [f"  {c.name.ljust(width)}  {c.summary}" for c in COMMANDS]
    lines += ["", "Run `dreamrt <command> --help` to see a command's config and its defaults."]
    return "\n".join(lines)


def _paragraph(text: str) -> str:
    return textwrap.fill(" ".join(text.split()), width=100, break_on_hyphens=False, break_long_words=False)
