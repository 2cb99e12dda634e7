"""The checkpoint format shared by policies and world models.

A checkpoint is one self-contained directory::

    step_000123/
      config.yaml            the model/job config as a plain mapping (yaml.safe_dump)
      model.safetensors      the model's state dict
      normalizer.json        normaliser statistics (strict JSON, may be {})
      meta.json              format version, versions, git revision, step, time, kind, sha256 per file
      training_state/        only in checkpoints a run can resume from
        state.json           step, optimizer/scheduler state structure, Python/NumPy RNG, counters
        tensors.safetensors  every tensor of that structure, e.g. ``optimizer.state.3.exp_avg``
        ema.safetensors      EMA weights, when training keeps them

A run directory holds ``checkpoints/step_XXXXXX/`` directories and ``checkpoints/last.txt``,
a one-line text file naming the newest one. A text pointer rather than a symlink: it is
replaced atomically like any file, survives copying to object stores, zip files and
filesystems without symlinks, and a stale one is detected and ignored.

Nothing here pickles or unpickles: tensors are safetensors, everything else is JSON or YAML
read with ``yaml.safe_load``. Writes go to a hidden temporary directory beside the target
and are renamed into place, so a crash leaves either the old state or the new one, never a
half-written checkpoint under a ``step_*`` name. Reads verify each file's sha256 against
``meta.json`` before parsing it. The layout, guarantees and a resume recipe are in
``docs/checkpoints.md``.

torch is imported inside the functions that need it, so inspecting a run (``read_meta``,
``latest_checkpoint``) stays cheap.
"""

from __future__ import annotations

import dataclasses
import datetime
import functools
import hashlib
import json
import math
import os
import re
import shutil
import subprocess
import types
import typing
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

import dreamrt
from dreamrt.errors import UserError, did_you_mean
from dreamrt.training.rng import RngState, capture_rng_state, restore_rng_state

if TYPE_CHECKING:
    import torch

FORMAT_NAME = "dreamrt-checkpoint"
# Bump when a reader of the previous version would misread a new checkpoint; readers refuse
# versions above their own.
FORMAT_VERSION = 1

CONFIG_FILE = "config.yaml"
MODEL_FILE = "model.safetensors"
NORMALIZER_FILE = "normalizer.json"
META_FILE = "meta.json"
TRAINING_STATE_DIR = "training_state"
TRAINING_STATE_FILE = "training_state/state.json"
TRAINING_TENSORS_FILE = "training_state/tensors.safetensors"
TRAINING_EMA_FILE = "training_state/ema.safetensors"
CHECKPOINTS_DIR = "checkpoints"
LAST_FILE = "last.txt"

_REQUIRED_FILES = (CONFIG_FILE, MODEL_FILE, NORMALIZER_FILE)
_STEP_DIR = re.compile(r"step_(\d+)")
_SHA256 = re.compile(r"[0-9a-f]{64}")
# Tags of the JSON encoding of nested state dicts: a tensor reference, a tuple, and a dict
# whose keys JSON cannot keep (optimizer state is keyed by int parameter ids).
_TENSOR, _TUPLE, _DICT = "__tensor__", "__tuple__", "__dict__"
_MAX_LISTED = 20


@dataclass(frozen=True)
class CheckpointMeta:
    """The contents of ``meta.json``."""

    format_version: int
    dreamrt_version: str
    torch_version: str | None
    # ``git rev-parse HEAD`` of the dreamrt source tree, None when not run from a git checkout.
    git_revision: str | None
    step: int
    # ISO-8601 with UTC offset.
    created_at: str
    # What built the weights, e.g. "policy/diffusion"; loaders can insist on it.
    kind: str
    # Path relative to the checkpoint directory (POSIX separators) -> sha256 hex digest.
    files: dict[str, str]

    @property
    def has_training_state(self) -> bool:
        return TRAINING_STATE_FILE in self.files


@dataclass(frozen=True)
class Checkpoint:
    """A loaded, verified checkpoint. ``model_state`` tensors are on the CPU."""

    path: Path
    meta: CheckpointMeta
    config: dict[str, Any]
    normalizer: dict[str, Any]
    model_state: dict[str, torch.Tensor]

    @property
    def step(self) -> int:
        return self.meta.step

    @property
    def kind(self) -> str:
        return self.meta.kind


@dataclass
class TrainingState:
    """Everything besides the weights that a run needs to continue exactly.

    ``optimizer`` and ``scheduler`` are their ``state_dict()``s; ``counters`` holds any
    JSON-able values the job wants back (epoch, best loss, samples seen). Build one with
    ``capture_training_state`` right before saving and apply one with
    ``restore_training_state``.
    """

    optimizer: dict[str, Any] | None = None
    scheduler: dict[str, Any] | None = None
    rng: RngState | None = None
    ema: dict[str, torch.Tensor] | None = None
    counters: dict[str, Any] = field(default_factory=dict)
    # Class names, so resuming with a different optimizer fails loudly instead of silently.
    optimizer_class: str | None = None
    scheduler_class: str | None = None


# --------------------------------------------------------------------------- training state


def capture_training_state(
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any | None = None,
    *,
    ema: Mapping[str, torch.Tensor] | None = None,
    counters: Mapping[str, Any] | None = None,
) -> TrainingState:
    """Snapshot optimizer, scheduler, global RNGs, EMA weights and counters.

    The optimizer and EMA tensors are referenced, not copied: save before the next step.
    """
    return TrainingState(
        optimizer=optimizer.state_dict() if optimizer is not None else None,
        scheduler=scheduler.state_dict() if scheduler is not None else None,
        rng=capture_rng_state(),
        ema=dict(ema) if ema is not None else None,
        counters=dict(counters or {}),
        optimizer_class=type(optimizer).__name__ if optimizer is not None else None,
        scheduler_class=type(scheduler).__name__ if scheduler is not None else None,
    )


def restore_training_state(
    state: TrainingState,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any | None = None,
) -> None:
    """Load optimizer and scheduler state into freshly built objects, then restore the RNGs.

    The optimizer must be built over the same parameters in the same order as the saved
    one; restore the model weights first. EMA weights and counters are the caller's to use.
    """
    for what, obj, saved, saved_class in (
        ("optimizer", optimizer, state.optimizer, state.optimizer_class),
        ("scheduler", scheduler, state.scheduler, state.scheduler_class),
    ):
        if obj is None:
            continue
        if saved is None:
            raise UserError(
                f"The checkpoint's training state has no {what} state, but a {type(obj).__name__} was passed "
                f"to restore it into. Resume without a {what}, or from a checkpoint saved with one."
            )
        if saved_class is not None and type(obj).__name__ != saved_class:
            raise UserError(
                f"The checkpoint's {what} state was saved from a {saved_class}, but a {type(obj).__name__} "
                f"was passed to restore it into. Build the same {what} class as the saved run."
            )
        try:
            obj.load_state_dict(saved)
        except (ValueError, KeyError, RuntimeError, TypeError) as err:
            raise UserError(
                f"The checkpoint's {what} state does not fit the {type(obj).__name__} passed in: {err}. "
                f"Build the {what} over the same parameters, in the same order and groups, as the saved run."
            ) from err
    if state.rng is not None:
        restore_rng_state(state.rng)


# --------------------------------------------------------------------------- writing


def save_checkpoint(
    path: str | os.PathLike[str],
    *,
    model_state: Mapping[str, torch.Tensor],
    config: Mapping[str, Any] | Any,
    normalizer: Mapping[str, Any],
    step: int,
    kind: str,
    training_state: TrainingState | None = None,
    overwrite: bool = False,
) -> Path:
    """Write a checkpoint directory atomically and return its path.

    ``config`` is a plain mapping or a config dataclass (saved as a mapping; tuples become
    lists). ``normalizer`` must be strict JSON (no NaN/inf, str keys). Tensors are moved to
    the CPU; tensors sharing storage (tied weights) are saved as separate copies. With
    ``overwrite`` an existing checkpoint at ``path`` is replaced; anything that is not a
    checkpoint is never replaced.
    """
    path = Path(path)
    step = _check_step(step)
    if not isinstance(kind, str) or not kind.strip():
        raise UserError(
            f"kind must be a non-empty string naming the model, got {kind!r}; e.g. 'policy/diffusion'."
        )
    if dataclasses.is_dataclass(config) and not isinstance(config, type):
        config = dataclasses.asdict(config)
    config_plain = _plain(config, "config", finite_only=False)
    if not isinstance(config_plain, dict):
        raise UserError(f"config must be a mapping or a config dataclass, got a {type(config).__name__}.")
    normalizer_plain = _plain(normalizer, "normalizer", finite_only=True)
    if not isinstance(normalizer_plain, dict):
        raise UserError(f"normalizer must be a mapping (possibly empty), got a {type(normalizer).__name__}.")
    model_tensors = _prepare_tensors(model_state, "model_state")
    if path.exists() or path.is_symlink():
        if not overwrite:
            raise UserError(
                f"Checkpoint directory {path} already exists. Pass overwrite=True to replace it, or choose "
                "another path."
            )
        if not (path.is_dir() and (path / META_FILE).is_file()) or path.is_symlink():
            raise UserError(
                f"Refusing to replace {path}: it exists but is not a dreamrt checkpoint directory (no "
                f"{META_FILE}). Move it away or choose another path."
            )

    import torch

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".tmp-{path.name}-{uuid.uuid4().hex[:12]}"
    tmp.mkdir()
    try:
        written = [
            _write_yaml(tmp, CONFIG_FILE, config_plain),
            _write_safetensors(tmp, MODEL_FILE, model_tensors),
            _write_json(tmp, NORMALIZER_FILE, normalizer_plain, allow_nan=False),
        ]
        if training_state is not None:
            written += _write_training_state(tmp, training_state, step)
        meta = CheckpointMeta(
            format_version=FORMAT_VERSION,
            dreamrt_version=dreamrt.__version__,
            torch_version=torch.__version__,
            git_revision=_git_revision(),
            step=step,
            created_at=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="milliseconds"),
            kind=kind,
            files={rel: _sha256(tmp / rel) for rel in written},
        )
        # meta.json goes last: a directory without it is never taken for a checkpoint.
        _write_json(tmp, META_FILE, {"format": FORMAT_NAME, **dataclasses.asdict(meta)}, allow_nan=False)
        _fsync_dir(tmp)
        if path.exists():
            trash = path.parent / f".trash-{path.name}-{uuid.uuid4().hex[:12]}"
            os.rename(path, trash)
            os.rename(tmp, path)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.rename(tmp, path)
        _fsync_dir(path.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def write_run_checkpoint(
    run_dir: str | os.PathLike[str],
    *,
    model_state: Mapping[str, torch.Tensor],
    config: Mapping[str, Any] | Any,
    normalizer: Mapping[str, Any],
    step: int,
    kind: str,
    training_state: TrainingState | None = None,
    keep_last: int | None = None,
) -> Path:
    """Save ``run_dir/checkpoints/step_XXXXXX`` and point ``checkpoints/last.txt`` at it.

    A checkpoint already saved for the same step (a run resumed from an earlier step) is
    replaced. With ``keep_last=n`` only the ``n`` checkpoints with the highest steps are
    kept, always including the one just written.
    """
    step = _check_step(step)
    if keep_last is not None and (type(keep_last) is not int or keep_last < 1):
        raise UserError(f"keep_last must be None (keep all) or an int >= 1, got {keep_last!r}.")
    checkpoints = Path(run_dir) / CHECKPOINTS_DIR
    target = checkpoints / f"step_{step:06d}"
    save_checkpoint(
        target,
        model_state=model_state,
        config=config,
        normalizer=normalizer,
        step=step,
        kind=kind,
        training_state=training_state,
        overwrite=True,
    )
    _atomic_write_text(checkpoints / LAST_FILE, target.name + "\n")
    if keep_last is not None:
        others = [p for _, p in _complete_checkpoints(checkpoints) if p != target]
        for old in others[: max(0, len(others) - (keep_last - 1))]:
            # Rename before deleting so a crash mid-delete leaves no step_* dir missing files.
            trash = checkpoints / f".trash-{old.name}-{uuid.uuid4().hex[:12]}"
            os.rename(old, trash)
            shutil.rmtree(trash, ignore_errors=True)
    return target


# --------------------------------------------------------------------------- finding


def latest_checkpoint(run_dir: str | os.PathLike[str]) -> Path | None:
    """The newest checkpoint of a run, or None when it has none (yet).

    ``checkpoints/last.txt`` decides when it names a complete checkpoint; when it is
    missing or stale (a crash between writing a checkpoint and the pointer, a deleted
    directory) the complete ``step_*`` directory with the highest step is used. Temporary
    directories left by a crash are ignored.
    """
    checkpoints = Path(run_dir) / CHECKPOINTS_DIR
    if not checkpoints.is_dir():
        return None
    try:
        name = (checkpoints / LAST_FILE).read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError):
        name = ""
    if _STEP_DIR.fullmatch(name) and (checkpoints / name / META_FILE).is_file():
        return checkpoints / name
    complete = _complete_checkpoints(checkpoints)
    return complete[-1][1] if complete else None


def resolve_checkpoint(path: str | os.PathLike[str]) -> Path:
    """Accept a checkpoint directory, a run directory or its ``checkpoints/`` folder, or ``shipped:<name>``
    (a checkpoint that ships with dreamrt); return the checkpoint."""
    from dreamrt.policies.shipped import resolve_policy_path

    path = Path(resolve_policy_path(str(path)))
    if (path / META_FILE).is_file():
        return path
    run_dir = path.parent if path.name == CHECKPOINTS_DIR else path
    if (run_dir / CHECKPOINTS_DIR).is_dir():
        latest = latest_checkpoint(run_dir)
        if latest is None:
            raise UserError(
                f"Run directory {run_dir} has no complete checkpoint yet: {run_dir / CHECKPOINTS_DIR} holds no "
                f"step_* directory with a {META_FILE}. Pass a run that has saved at least once."
            )
        return latest
    if not path.exists():
        raise UserError(f"No checkpoint at {path}: the path does not exist.")
    raise UserError(
        f"{path} is not a dreamrt checkpoint: expected a checkpoint directory (with {META_FILE}) or a run "
        f"directory (with {CHECKPOINTS_DIR}/). Pass e.g. outputs/<run>/checkpoints/step_001000 or outputs/<run>."
    )


# --------------------------------------------------------------------------- reading


def read_meta(path: str | os.PathLike[str]) -> CheckpointMeta:
    """Read and validate ``meta.json`` (format and version) without touching the weights."""
    return _read_meta(resolve_checkpoint(path))


def load_checkpoint(path: str | os.PathLike[str], *, kind: str | None = None) -> Checkpoint:
    """Load and verify a checkpoint (a checkpoint directory, or a run directory for its newest).

    Refuses unknown format versions, missing files, files whose sha256 differs from
    ``meta.json``, and (when ``kind`` is given) checkpoints of another kind. The training
    state is not read; see ``load_training_state``.
    """
    ckpt_dir = resolve_checkpoint(path)
    meta = _read_meta(ckpt_dir)
    if kind is not None and meta.kind != kind:
        raise UserError(
            f"Checkpoint {ckpt_dir} holds a '{meta.kind}' model, but a '{kind}' was expected. Pass a checkpoint "
            f"saved by a '{kind}' run."
        )
    _check_present(ckpt_dir, meta, _REQUIRED_FILES)
    config = _parse_yaml(_verified(ckpt_dir, meta, CONFIG_FILE), ckpt_dir)
    normalizer = _parse_json(_verified(ckpt_dir, meta, NORMALIZER_FILE), ckpt_dir, NORMALIZER_FILE)
    if not isinstance(normalizer, dict):
        raise UserError(
            f"{NORMALIZER_FILE} in checkpoint {ckpt_dir} holds a {type(normalizer).__name__}, expected a JSON "
            "object."
        )
    model_state = _load_safetensors(_verified(ckpt_dir, meta, MODEL_FILE), ckpt_dir, MODEL_FILE)
    return Checkpoint(path=ckpt_dir, meta=meta, config=config, normalizer=normalizer, model_state=model_state)


def load_into(model: torch.nn.Module, checkpoint: Checkpoint) -> None:
    """Copy the checkpoint's weights into ``model`` after checking names and shapes match exactly."""
    expected = model.state_dict()
    got = checkpoint.model_state
    missing = [k for k in expected if k not in got]
    unexpected = [k for k in got if k not in expected]
    mismatched = [
        k for k in expected if k in got and tuple(getattr(expected[k], "shape", ())) != tuple(got[k].shape)
    ]
    if missing or unexpected or mismatched:
        parts = [
            f"Checkpoint {checkpoint.path} (kind '{checkpoint.kind}', step {checkpoint.step}) does not fit "
            f"{type(model).__name__}:"
        ]
        if missing:
            parts.append(
                f"missing from the checkpoint ({len(missing)}): "
                + _listing(f"{k} {_shape(expected[k])}" for k in missing)
            )
        if unexpected:
            parts.append(
                f"unexpected in the checkpoint ({len(unexpected)}): "
                + _listing(f"{k} {_shape(got[k])}" for k in unexpected)
            )
        if mismatched:
            parts.append(
                f"shape mismatches ({len(mismatched)}, checkpoint vs model): "
                + _listing(f"{k} {_shape(got[k])} vs {_shape(expected[k])}" for k in mismatched)
            )
        parts.append(
            "Build the model from the checkpoint's config.yaml, or pass the checkpoint of this model."
        )
        raise UserError(" ".join(parts))
    model.load_state_dict(got, strict=True)


def load_training_state(path: str | os.PathLike[str]) -> TrainingState:
    """Load and verify the training state of a checkpoint (or of a run's newest checkpoint)."""
    import torch

    ckpt_dir = resolve_checkpoint(path)
    meta = _read_meta(ckpt_dir)
    if not meta.has_training_state:
        raise UserError(
            f"Checkpoint {ckpt_dir} has no training state (it was saved for inference only), so a run cannot "
            "resume from it. Resume from a checkpoint written with a training_state, or start a new run "
            "initialised from these weights."
        )
    names = [TRAINING_STATE_FILE, TRAINING_TENSORS_FILE]
    if TRAINING_EMA_FILE in meta.files:
        names.append(TRAINING_EMA_FILE)
    _check_present(ckpt_dir, meta, names)
    doc = _parse_json(_verified(ckpt_dir, meta, TRAINING_STATE_FILE), ckpt_dir, TRAINING_STATE_FILE)
    tensors = _load_safetensors(
        _verified(ckpt_dir, meta, TRAINING_TENSORS_FILE), ckpt_dir, TRAINING_TENSORS_FILE
    )
    ema = None
    if TRAINING_EMA_FILE in meta.files:
        ema = _load_safetensors(_verified(ckpt_dir, meta, TRAINING_EMA_FILE), ckpt_dir, TRAINING_EMA_FILE)

    def malformed(why: str) -> UserError:
        return UserError(
            f"{TRAINING_STATE_FILE} in checkpoint {ckpt_dir} is malformed: {why}. It matches its sha256, so it "
            "was written that way; resume from another checkpoint."
        )

    keys = {"step", "optimizer", "scheduler", "rng", "counters", "optimizer_class", "scheduler_class"}
    if not isinstance(doc, dict) or set(doc) != keys:
        raise malformed(f"expected an object with keys {sorted(keys)}")
    if not isinstance(doc["counters"], dict):
        raise malformed("'counters' must be an object")
    if doc["step"] != meta.step:
        raise malformed(f"it records step {doc['step']!r} but {META_FILE} records step {meta.step}")
    try:
        decoded = {k: _decode(doc[k], tensors) for k in ("optimizer", "scheduler", "rng")}
    except KeyError as err:
        raise malformed(f"it references tensor {err} that {TRAINING_TENSORS_FILE} does not hold") from err
    rng = None
    if decoded["rng"] is not None:
        r = decoded["rng"]
        if not (isinstance(r, dict) and set(r) == {"python", "numpy", "torch", "cuda"}):
            raise malformed("the rng entry needs keys python, numpy, torch, cuda")
        if not isinstance(r["torch"], torch.Tensor) or not all(
            isinstance(t, torch.Tensor) for t in r["cuda"]
        ):
            raise malformed("the torch/cuda RNG states must be tensors")
        rng = RngState(python=r["python"], numpy=r["numpy"], torch=r["torch"], cuda=list(r["cuda"]))
    return TrainingState(
        optimizer=decoded["optimizer"],
        scheduler=decoded["scheduler"],
        rng=rng,
        ema=ema,
        counters=doc["counters"],
        optimizer_class=doc["optimizer_class"],
        scheduler_class=doc["scheduler_class"],
    )


def config_from_dict(cls: type, data: Mapping[str, Any], *, source: str = "config") -> Any:
    """Build config dataclass ``cls`` from a checkpoint's config mapping, refusing unknown and missing keys.

    Nested dataclass fields (also inside Optional, list, tuple and dict[str, ...]) are
    built recursively; lists become tuples where the field is a tuple. Value checks are
    left to the dataclasses' ``__post_init__``.
    """
    if not (isinstance(cls, type) and dataclasses.is_dataclass(cls)):
        raise TypeError(f"config_from_dict needs a dataclass type, got {cls!r}")
    if not isinstance(data, Mapping):
        raise UserError(
            f"{source} must be a mapping for {cls.__name__}, got a {type(data).__name__}: {data!r:.80}."
        )
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = [k for k in data if k not in fields]
    if unknown:
        key = unknown[0]
        raise UserError(
            f"{source} has unknown key '{key}' for {cls.__name__}.{did_you_mean(str(key), fields)} "
            f"Valid keys: {', '.join(fields)}. The checkpoint was probably saved by another version of the "
            "model code; use a matching dreamrt version or edit config.yaml."
        )
    missing = [
        name
        for name, f in fields.items()
        if name not in data and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        raise UserError(
            f"{source} lacks required key(s) {', '.join(missing)} for {cls.__name__}. Add them to config.yaml or "
            "use the dreamrt version that saved the checkpoint."
        )
    try:
        hints = typing.get_type_hints(cls)
    except (NameError, TypeError):
        # Annotations naming classes that are not importable (a dataclass defined in a
        # function): keep values as loaded and let __post_init__ judge them.
        hints = {}
    kwargs = {k: _build_value(hints.get(k, Any), v, f"{source}.{k}") for k, v in data.items()}
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as err:
        raise UserError(f"{source} does not make a valid {cls.__name__}: {err}") from err


# --------------------------------------------------------------------------- helpers


def _check_step(step: Any) -> int:
    if type(step) is not int or step < 0:
        raise UserError(f"step must be a non-negative int, got {step!r} ({type(step).__name__}).")
    return step


def _plain(value: Any, where: str, *, finite_only: bool) -> Any:
    """A copy of ``value`` made of dict[str, ...]/list/str/int/float/bool/None, or a UserError."""
    if value is None or type(value) in (bool, int, str):
        return value
    if isinstance(value, float):  # also NumPy float64, which subclasses float
        if finite_only and not math.isfinite(value):
            raise UserError(
                f"{where} is {value}, but this file is strict JSON, which has no NaN or infinity. Fix the "
                "value (e.g. a zero standard deviation) before saving."
            )
        return float(value)
    if isinstance(value, (list, tuple)):
        return [_plain(v, f"{where}[{i}]", finite_only=finite_only) for i, v in enumerate(value)]
    if isinstance(value, Mapping):
        out = {}
        for k, v in value.items():
            if type(k) is not str:
                raise UserError(
                    f"{where} has key {k!r} of type {type(k).__name__}; keys must be str so they survive the "
                    "JSON/YAML round trip. Convert the keys with str()."
                )
            out[k] = _plain(v, f"{where}.{k}", finite_only=finite_only)
        return out
    raise UserError(
        f"{where} is a {type(value).__name__} ({value!r:.60}); it may only hold mappings with str keys, lists, "
        "str, int, float, bool and None. Convert it first (arrays with .tolist(), paths with str())."
    )


def _prepare_tensors(tensors: Mapping[str, Any], where: str) -> dict[str, torch.Tensor]:
    """Detached, contiguous CPU tensors, with storage shared between entries copied apart."""
    import torch

    if not isinstance(tensors, Mapping):
        raise UserError(f"{where} must be a mapping of names to tensors, got a {type(tensors).__name__}.")
    out: dict[str, torch.Tensor] = {}
    storages: set[int] = set()
    for name, tensor in tensors.items():
        if type(name) is not str:
            raise UserError(
                f"{where} has key {name!r} of type {type(name).__name__}; tensor names must be str."
            )
        if not isinstance(tensor, torch.Tensor):
            raise UserError(
                f"{where}['{name}'] is a {type(tensor).__name__}, expected a torch.Tensor. Only tensors can be "
                "saved as weights."
            )
        tensor = tensor.detach().to("cpu").contiguous()
        if tensor.numel() > 0:
            # safetensors refuses aliased tensors (tied weights); each gets its own copy.
            ptr = tensor.untyped_storage().data_ptr()
            if ptr in storages:
                tensor = tensor.clone()
                ptr = tensor.untyped_storage().data_ptr()
            storages.add(ptr)
        out[name] = tensor
    return out


def _encode(value: Any, key: str, tensors: dict[str, Any]) -> Any:
    """JSON-able structure for a nested state dict; tensors go to ``tensors`` under dotted keys."""
    import torch

    if isinstance(value, torch.Tensor):
        name = key if key not in tensors else f"{key}#{len(tensors)}"
        tensors[name] = value
        return {_TENSOR: name}
    if value is None or type(value) in (bool, int, str):
        return value
    if isinstance(value, float):
        return float(value)
    if isinstance(value, tuple):
        return {_TUPLE: [_encode(v, f"{key}.{i}", tensors) for i, v in enumerate(value)]}
    if isinstance(value, list):
        return [_encode(v, f"{key}.{i}", tensors) for i, v in enumerate(value)]
    if isinstance(value, Mapping):
        if all(type(k) is str and not k.startswith("__") for k in value):
            return {k: _encode(v, f"{key}.{k}", tensors) for k, v in value.items()}
        items = []
        for k, v in value.items():
            if not (k is None or type(k) in (bool, int, float, str)):
                raise UserError(
                    f"{key} has key {k!r} of type {type(k).__name__}, which cannot be saved without pickle."
                )
            items.append([k, _encode(v, f"{key}.{k}", tensors)])
        return {_DICT: items}
    raise UserError(
        f"{key} is a {type(value).__name__} ({value!r:.60}), which cannot be saved without pickle. Training "
        "state may hold tensors, mappings, lists, tuples, str, int, float, bool and None."
    )


def _decode(value: Any, tensors: Mapping[str, Any]) -> Any:
    if isinstance(value, list):
        return [_decode(v, tensors) for v in value]
    if isinstance(value, dict):
        if len(value) == 1:
            tag, inner = next(iter(value.items()))
            if tag == _TENSOR:
                return tensors[inner]
            if tag == _TUPLE:
                return tuple(_decode(v, tensors) for v in inner)
            if tag == _DICT:
                return {k: _decode(v, tensors) for k, v in inner}
        return {k: _decode(v, tensors) for k, v in value.items()}
    return value


def _write_training_state(root: Path, state: TrainingState, step: int) -> list[str]:
    if not isinstance(state, TrainingState):
        raise UserError(
            f"training_state must be a TrainingState (see capture_training_state), got a {type(state).__name__}."
        )
    (root / TRAINING_STATE_DIR).mkdir()
    tensors: dict[str, Any] = {}
    rng = None
    if state.rng is not None:
        r = state.rng
        rng = {"python": r.python, "numpy": r.numpy, "torch": r.torch, "cuda": list(r.cuda)}
    doc = {
        "step": step,
        "optimizer": _encode(state.optimizer, "optimizer", tensors),
        "scheduler": _encode(state.scheduler, "scheduler", tensors),
        "rng": _encode(rng, "rng", tensors),
        "counters": _plain(state.counters, "counters", finite_only=False),
        "optimizer_class": state.optimizer_class,
        "scheduler_class": state.scheduler_class,
    }
    written = [
        # Python's json keeps NaN/inf (e.g. a best loss of inf); only Python reads this file.
        _write_json(root, TRAINING_STATE_FILE, doc, allow_nan=True),
        _write_safetensors(root, TRAINING_TENSORS_FILE, _prepare_tensors(tensors, "training state")),
    ]
    if state.ema is not None:
        written.append(_write_safetensors(root, TRAINING_EMA_FILE, _prepare_tensors(state.ema, "ema")))
    _fsync_dir(root / TRAINING_STATE_DIR)
    return written


def _build_value(tp: Any, value: Any, where: str) -> Any:
    """Turn YAML-loaded ``value`` into what field type ``tp`` holds (nested dataclasses, tuples)."""
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        return config_from_dict(tp, value, source=where) if value is not None else None
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None:
            return None
        classes = [a for a in args if isinstance(a, type) and dataclasses.is_dataclass(a)]
        if classes and isinstance(value, Mapping):
            return config_from_dict(classes[0], value, source=where)
        others = [a for a in args if a is not type(None)]
        return _build_value(others[0], value, where) if len(others) == 1 else value
    if origin is list and isinstance(value, list) and args:
        return [_build_value(args[0], v, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is tuple and isinstance(value, (list, tuple)):
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_build_value(args[0], v, f"{where}[{i}]") for i, v in enumerate(value))
        if args and len(args) == len(value):
            return tuple(_build_value(a, v, f"{where}[{i}]") for i, (a, v) in enumerate(zip(args, value)))
        return tuple(value)
    if origin is dict and isinstance(value, Mapping) and len(args) == 2:
        return {k: _build_value(args[1], v, f"{where}.{k}") for k, v in value.items()}
    return value


def _read_meta(ckpt_dir: Path) -> CheckpointMeta:
    meta_path = ckpt_dir / META_FILE
    if not meta_path.is_file():
        raise UserError(f"{ckpt_dir} is not a dreamrt checkpoint: {META_FILE} is missing.")
    data = _parse_json(meta_path, ckpt_dir, META_FILE)
    if not isinstance(data, dict) or data.get("format") != FORMAT_NAME:
        found = data.get("format") if isinstance(data, dict) else type(data).__name__
        raise UserError(
            f"{META_FILE} in {ckpt_dir} is not dreamrt checkpoint metadata: its 'format' is {found!r}, expected "
            f"'{FORMAT_NAME}'. Pass a directory written by dreamrt's save_checkpoint."
        )
    version = data.get("format_version")
    if type(version) is not int or version < 1:
        raise UserError(
            f"Checkpoint {ckpt_dir} has unknown format_version {version!r}; this dreamrt "
            f"({dreamrt.__version__}) reads versions 1 to {FORMAT_VERSION}. The {META_FILE} is damaged or was "
            "not written by dreamrt."
        )
    if version > FORMAT_VERSION:
        raise UserError(
            f"Checkpoint {ckpt_dir} uses format version {version}, written by dreamrt "
            f"{data.get('dreamrt_version', '?')}; this dreamrt ({dreamrt.__version__}) reads versions up to "
            f"{FORMAT_VERSION}. Upgrade dreamrt to load it."
        )
    names = [f.name for f in dataclasses.fields(CheckpointMeta)]
    absent = [n for n in names if n not in data]
    if absent:
        raise UserError(f"{META_FILE} in {ckpt_dir} is damaged: it lacks {', '.join(absent)}.")
    files = data["files"]
    if not isinstance(files, dict) or not all(
        isinstance(k, str) and _safe_relative(k) and isinstance(v, str) and _SHA256.fullmatch(v)
        for k, v in files.items()
    ):
        raise UserError(
            f"{META_FILE} in {ckpt_dir} is damaged: 'files' must map relative file names to sha256 hex digests."
        )
    unlisted = [name for name in _REQUIRED_FILES if name not in files]
    if unlisted:
        raise UserError(
            f"{META_FILE} in {ckpt_dir} is damaged: it records no sha256 for {', '.join(unlisted)}."
        )
    if type(data["step"]) is not int or data["step"] < 0 or not isinstance(data["kind"], str):
        raise UserError(
            f"{META_FILE} in {ckpt_dir} is damaged: 'step' must be an int >= 0 and 'kind' a string."
        )
    return CheckpointMeta(**{n: data[n] for n in names})


def _safe_relative(name: str) -> bool:
    parts = name.split("/")
    return (
        bool(name)
        and not name.startswith("/")
        and "\\" not in name
        and all(p not in ("", ".", "..") for p in parts)
    )


def _check_present(ckpt_dir: Path, meta: CheckpointMeta, names: typing.Iterable[str]) -> None:
    missing = [n for n in names if not (ckpt_dir / n).is_file()]
    if missing:
        raise UserError(
            f"Checkpoint {ckpt_dir} is incomplete: {', '.join(missing)} missing (recorded in {META_FILE} at "
            f"step {meta.step}). Restore the files or use another checkpoint."
        )


def _verified(ckpt_dir: Path, meta: CheckpointMeta, name: str) -> Path:
    path = ckpt_dir / name
    actual = _sha256(path)
    if actual != meta.files[name]:
        raise UserError(
            f"{name} in checkpoint {ckpt_dir} is corrupted: its sha256 is {actual}, but {META_FILE} recorded "
            f"{meta.files[name]}. The file changed after saving; restore it or use another checkpoint (e.g. an "
            f"earlier step in {ckpt_dir.parent})."
        )
    return path


def _parse_json(path: Path, ckpt_dir: Path, name: str) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise UserError(
            f"{name} in checkpoint {ckpt_dir} is not valid JSON ({err}); the file is damaged."
        ) from err


def _parse_yaml(path: Path, ckpt_dir: Path) -> dict[str, Any]:
    try:
        config = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        raise UserError(f"{CONFIG_FILE} in checkpoint {ckpt_dir} is not valid YAML ({err}).") from err
    if not isinstance(config, dict) or not all(isinstance(k, str) for k in config):
        raise UserError(f"{CONFIG_FILE} in checkpoint {ckpt_dir} must hold a mapping with string keys.")
    return config


def _load_safetensors(path: Path, ckpt_dir: Path, name: str) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(path, device="cpu")
    except (SafetensorError, OSError) as err:
        raise UserError(
            f"{name} in checkpoint {ckpt_dir} is not a readable safetensors file ({err})."
        ) from err


def _write_yaml(root: Path, name: str, data: dict[str, Any]) -> str:
    with open(root / name, "w", encoding="utf-8") as f:
        yaml.safe_dump(data, f, sort_keys=False, allow_unicode=True)
        _flush(f)
    return name


def _write_json(root: Path, name: str, data: Any, *, allow_nan: bool) -> str:
    with open(root / name, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=1, allow_nan=allow_nan)
        f.write("\n")
        _flush(f)
    return name


def _write_safetensors(root: Path, name: str, tensors: dict[str, torch.Tensor]) -> str:
    from safetensors.torch import save_file

    save_file(tensors, root / name, metadata={"format": "pt"})
    with open(root / name, "rb+") as f:
        os.fsync(f.fileno())
    return name


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.parent / f".tmp-{path.name}-{uuid.uuid4().hex[:12]}"
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            _flush(f)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def _flush(f: typing.IO[Any]) -> None:
    f.flush()
    os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    """Make renames inside ``path`` durable; not possible on every platform, so best effort."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _complete_checkpoints(checkpoints: Path) -> list[tuple[int, Path]]:
    """(step, path) of every ``step_*`` directory with a meta.json, by increasing step."""
    found = []
    for child in checkpoints.iterdir():
        match = _STEP_DIR.fullmatch(child.name)
        if match and child.is_dir() and (child / META_FILE).is_file():
            found.append((int(match.group(1)), child))
    return sorted(found)


def _shape(tensor: Any) -> str:
    shape = getattr(tensor, "shape", None)
    return f"[{', '.join(str(d) for d in shape)}]" if shape is not None else f"({type(tensor).__name__})"


def _listing(items: typing.Iterable[str]) -> str:
    items = list(items)
    shown = "; ".join(items[:_MAX_LISTED])
    return shown + (f"; ... and {len(items) - _MAX_LISTED} more." if len(items) > _MAX_LISTED else ".")


@functools.cache
def _git_revision() -> str | None:
    """HEAD of the git checkout dreamrt runs from, or None (installed package, no git, no commits).

    Asking git whether the package's own ``__init__.py`` is tracked first keeps a
    site-packages install inside some other repository from reporting that repository's HEAD.
    """
    source_dir = Path(dreamrt.__file__).resolve().parent
    try:
        tracked = subprocess.run(
            ["git", "ls-files", "--error-unmatch", "__init__.py"],
            cwd=source_dir,
            capture_output=True,
            timeout=10,
            check=False,
        )
        if tracked.returncode != 0:
            return None
        head = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=source_dir, capture_output=True, timeout=10, check=False
        )
    except (OSError, subprocess.SubprocessError):
        return None
    revision = head.stdout.decode("ascii", errors="replace").strip()
    return (
        revision if head.returncode == 0 and re.fullmatch(r"[0-9a-f]{40}([0-9a-f]{24})?", revision) else None
    )
