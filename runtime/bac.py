"""BAC at inference: a denoiser that recomputes each sub-block only at its scheduled steps.

Block-wise Adaptive Caching (Ji et al. 2025) is training-free. A :class:`BACSchedule` lists,
for every residual sub-block of a transformer denoiser (DP-T's ``model.sub_blocks``; any
model with the same contract), the sampler steps at which it is recomputed. At every other
step the block's residual from its latest update step is reused: ``x = x + cache[block]``.
The condition encoder and the output head always run.

    schedule = load_schedule(checkpoint_dir / "bac_schedule.json")
    cached = CachedDenoiser(model, schedule, sampler)      # checks blocks and sampler steps
    x0 = sampler.sample(cached(obs_features), x_T, generator=g)

``cached(*conditioning)`` is a denoiser factory: each call starts a fresh :class:`BlockCache`
(one per chunk, i.e. per sampling run) and returns ``denoise(x_t, t)`` for the sampler, which
calls ``model(x_t, t, *conditioning, run_block=...)`` through DP-T's ``run_block`` hook. The
update decisions are a precomputed (K, N) boolean table, so a block costs one tuple index on
top of the model's own work. The denoiser insists that the sampler visits exactly the
schedule's timesteps in order (a schedule is calibrated for one sampler).

Schedules are JSON (``bac_schedule.json``, stored with the checkpoint or in a calibration run
directory); ``uniform_schedule`` (every k-th step, the baseline) and ``full_schedule``
(every step: the uncached model) come from the same type.

Dimensions: K sampler steps, N sub-blocks, B batch.
"""

from __future__ import annotations

import json
import numbers
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dreamrt.errors import UserError
from dreamrt.runtime.bac_schedule import uniform_update_steps

if TYPE_CHECKING:
    from torch import Tensor, nn

SCHEDULE_FILE = "bac_schedule.json"  # its name beside a checkpoint's model.safetensors
FORMAT = "dreamrt-bac-schedule"
FORMAT_VERSION = 1
METHODS = ("bac", "uniform", "full")
FFN_KIND = "ffn"  # the last name component of feed-forward sub-blocks (``layers.3.ffn``)

Denoiser = Callable[["Tensor", int], "Tensor"]


# ---------------------------------------------------------------------------- schedule


@dataclass(frozen=True)
class BACSchedule:
    """Per sub-block update steps for one model and one sampler.

    ``blocks`` and ``block_params`` (parameter count per block) identify the model's
    sub-blocks in execution order; ``timesteps`` are the sampler's, in the order it visits
    them (step i sees ``timesteps[i]``); ``update_steps[j]`` are the steps at which block j
    is recomputed (sorted, step 0 always). ``settings`` records how the schedule was made
    (JSON values only).
    """

    blocks: tuple[str, ...]
    block_params: tuple[int, ...]
    update_steps: tuple[tuple[int, ...], ...]
    sampler: str  # the sampler's name, e.g. "ddpm"
    timesteps: tuple[int, ...]
    method: str = "bac"  # one of METHODS
    settings: Mapping[str, Any] = field(default_factory=dict, compare=False, hash=False)
    origin: str = field(
        default="this BAC schedule", compare=False
    )  # for error messages (the file), not saved

    def __post_init__(self) -> None:
        object.__setattr__(self, "blocks", tuple(str(b) for b in self.blocks))
        object.__setattr__(self, "block_params", tuple(_int(p, "block_params") for p in self.block_params))
        object.__setattr__(self, "timesteps", tuple(_int(t, "timesteps") for t in self.timesteps))
        object.__setattr__(
            self, "update_steps", tuple(tuple(_int(s, "update_steps") for s in u) for u in self.update_steps)
        )
        n, k = len(self.blocks), len(self.timesteps)
        if n == 0 or k == 0:
            raise UserError(
                f"A BAC schedule needs at least one block and one step, got {n} blocks, {k} steps."
            )
        if len(set(self.blocks)) != n:
            dupes = sorted({b for b in self.blocks if self.blocks.count(b) > 1})
            raise UserError(f"BAC schedule lists sub-blocks more than once: {dupes}.")
        if len(self.block_params) != n or len(self.update_steps) != n:
            raise UserError(
                f"BAC schedule has {n} blocks but {len(self.block_params)} parameter counts and "
                f"{len(self.update_steps)} update-step lists; give one of each per block."
            )
        if self.method not in METHODS:
            raise UserError(
                f"Unknown BAC schedule method '{self.method}'; expected one of {', '.join(METHODS)}."
            )
        for name, steps in zip(self.blocks, self.update_steps):
            if not steps or steps[0] != 0 or any(a >= b for a, b in zip(steps, steps[1:])) or steps[-1] >= k:
                raise UserError(
                    f"Update steps of block '{name}' must be strictly increasing step indices in [0, {k}) "
                    f"starting with 0 (the cache is empty before step 0), got {list(steps)}."
                )

    @property
    def num_steps(self) -> int:
        return len(self.timesteps)

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    def update_table(self) -> tuple[tuple[bool, ...], ...]:
        """(K, N): whether block j is recomputed at step i."""
        sets = [set(steps) for steps in self.update_steps]
        return tuple(tuple(i in s for s in sets) for i in range(self.num_steps))

    @property
    def compute_fraction(self) -> float:
        """Block evaluations with this schedule / without caching, counting every block alike."""
        return sum(len(s) for s in self.update_steps) / (self.num_blocks * self.num_steps)

    def describe(self) -> dict[str, Any]:
        """A small JSON summary: method, sampler, update counts."""
        counts = [len(s) for s in self.update_steps]
        return {
            "method": self.method,
            "sampler": self.sampler,
            "num_steps": self.num_steps,
            "num_blocks": self.num_blocks,
            "updates_min": min(counts),
            "updates_max": max(counts),
            "updates_mean": round(sum(counts) / len(counts), 3),
            "compute_fraction": round(self.compute_fraction, 4),
        }


def _int(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):  # numpy integers are Integral
        raise UserError(f"BAC schedule field {what} must hold integers, got {value!r}.")
    return int(value)


def model_blocks(model: nn.Module) -> tuple[tuple[str, ...], tuple[int, ...]]:
    """Names and parameter counts of a denoiser's residual sub-blocks (``model.sub_blocks``)."""
    sub_blocks = getattr(model, "sub_blocks", None)
    if sub_blocks is None:
        raise UserError(
            f"{type(model).__name__} has no `sub_blocks`: BAC caches denoisers built from dreamrt's residual "
            "sub-blocks (DP-T). Pass the transformer denoiser itself, e.g. policy.model."
        )
    names = tuple(name for name, _ in sub_blocks)
    params = tuple(sum(p.numel() for p in block.parameters()) for _, block in sub_blocks)
    return names, params


def is_ffn(block_name: str) -> bool:
    """Feed-forward sub-blocks are named ``<layer path>.ffn``; Bubbling Union refreshes upstream of them."""
    return block_name.rsplit(".", 1)[-1] == FFN_KIND


def sampler_name(sampler: Any) -> str:
    """``ddpm`` / ``ddim`` for dreamrt's samplers, else the class name."""
    name = type(sampler).__name__
    return {"DDPMSampler": "ddpm", "DDIMSampler": "ddim"}.get(name, name)


def make_schedule(
    model: nn.Module,
    sampler: Any,
    update_steps: Sequence[Sequence[int]],
    method: str = "bac",
    settings: Mapping[str, Any] | None = None,
) -> BACSchedule:
    """A schedule for ``model``'s sub-blocks and ``sampler``'s timesteps from per-block update steps."""
    names, params = model_blocks(model)
    return BACSchedule(
        blocks=names,
        block_params=params,
        update_steps=tuple(tuple(s) for s in update_steps),
        sampler=sampler_name(sampler),
        timesteps=tuple(int(t) for t in sampler.timesteps),
        method=method,
        settings=dict(settings or {}),
    )


def full_schedule(model: nn.Module, sampler: Any) -> BACSchedule:
    """Every block at every step: the uncached model (a reference and a test of the wrapper)."""
    k = len(sampler.timesteps)
    n = len(model_blocks(model)[0])
    return make_schedule(model, sampler, [tuple(range(k))] * n, method="full")


def uniform_schedule(model: nn.Module, sampler: Any, every: int) -> BACSchedule:
    """Uniform caching, BAC's baseline: every block at steps 0, every, 2*every, ..."""
    steps = uniform_update_steps(len(sampler.timesteps), every)
    n = len(model_blocks(model)[0])
    return make_schedule(model, sampler, [steps] * n, method="uniform", settings={"every": every})


def check_schedule(schedule: BACSchedule, model: nn.Module, sampler: Any | None = None) -> None:
    """Raise a UserError unless ``schedule`` was made for ``model``'s sub-blocks (and ``sampler``'s steps)."""
    names, params = model_blocks(model)
    source = schedule.origin
    fix = "calibrate a schedule for this model and sampler with `dreamrt bac calibrate policy.path=CKPT`."
    if names != schedule.blocks:
        extra = [b for b in schedule.blocks if b not in names]
        missing = [b for b in names if b not in schedule.blocks]
        raise UserError(
            f"{source} is for another model: it lists {schedule.num_blocks} sub-blocks, the model has {len(names)} "
            f"(only in the schedule: {extra[:6]}; only in the model: {missing[:6]}). To fix, {fix}"
        )
    if params != schedule.block_params:
        diff = [(b, s, m) for b, s, m in zip(names, schedule.block_params, params) if s != m]
        b, s, m = diff[0]
        raise UserError(
            f"{source} is for a model of another width: block '{b}' had {s} parameters, this model's has {m} "
            f"({len(diff)} blocks differ). To fix, {fix}"
        )
    if sampler is not None:
        timesteps = tuple(int(t) for t in sampler.timesteps)
        if timesteps != schedule.timesteps:
            raise UserError(
                f"{source} was calibrated for a {schedule.num_steps}-step {schedule.sampler} sampler (timesteps "
                f"{_preview(schedule.timesteps)}), but the sampler here is a {len(timesteps)}-step "
                f"{sampler_name(sampler)} (timesteps {_preview(timesteps)}). Use the schedule's sampler, or "
                f"{fix}"
            )


def _preview(values: Sequence[int], k: int = 4) -> str:
    values = list(values)
    return str(values) if len(values) <= 2 * k else f"[{', '.join(map(str, values[:k]))}, ..., {values[-1]}]"


# ---------------------------------------------------------------------------- file I/O


def schedule_to_dict(schedule: BACSchedule) -> dict[str, Any]:
    """The JSON object of ``bac_schedule.json``."""
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "method": schedule.method,
        "sampler": {
            "name": schedule.sampler,
            "num_steps": schedule.num_steps,
            "timesteps": list(schedule.timesteps),
        },
        "blocks": [
            {"name": name, "params": params, "update_steps": list(steps)}
            for name, params, steps in zip(schedule.blocks, schedule.block_params, schedule.update_steps)
        ],
        "summary": schedule.describe(),  # for readers; recomputed, never trusted, on load
        "settings": dict(schedule.settings),
    }


def schedule_from_dict(data: Any, source: str = "BAC schedule") -> BACSchedule:
    """Validate and build a schedule from its JSON object; UserErrors name ``source``."""
    if not isinstance(data, Mapping) or data.get("format") != FORMAT:
        raise UserError(
            f'{source} is not a BAC schedule: expected a JSON object with "format": "{FORMAT}", got '
            f"{type(data).__name__}{'' if not isinstance(data, Mapping) else ' with format ' + repr(data.get('format'))}."
        )
    version = data.get("format_version")
    if isinstance(version, bool) or not isinstance(version, int) or not 1 <= version <= FORMAT_VERSION:
        raise UserError(
            f"{source} has format_version {version!r}; this dreamrt reads versions 1..{FORMAT_VERSION}. "
            "Upgrade dreamrt or recalibrate."
        )
    try:
        sampler, blocks = data["sampler"], data["blocks"]
        timesteps = sampler["timesteps"]
        if not isinstance(blocks, list) or not isinstance(timesteps, list):
            raise TypeError("blocks and sampler.timesteps must be lists")
        if sampler.get("num_steps", len(timesteps)) != len(timesteps):
            raise UserError(
                f"{source}: sampler.num_steps is {sampler['num_steps']} but {len(timesteps)} timesteps are listed."
            )
        settings = data.get("settings", {})
        if not isinstance(settings, Mapping):
            raise TypeError(f"settings must be an object, got {type(settings).__name__}")
        return BACSchedule(
            blocks=tuple(b["name"] for b in blocks),
            block_params=tuple(b["params"] for b in blocks),
            update_steps=tuple(tuple(b["update_steps"]) for b in blocks),
            sampler=str(sampler["name"]),
            timesteps=tuple(timesteps),
            method=str(data.get("method", "bac")),
            settings=dict(settings),
            origin=source,
        )
    except (KeyError, TypeError) as error:
        raise UserError(
            f"{source} is malformed ({type(error).__name__}: {error}). It needs sampler.name, sampler.timesteps "
            "and blocks[].name/params/update_steps; recalibrate with `dreamrt bac calibrate`."
        ) from None


def save_schedule(schedule: BACSchedule, path: str | Path, *, overwrite: bool = True) -> Path:
    """Write ``schedule`` as JSON to ``path`` (a file, or a directory for its ``bac_schedule.json``)."""
    path = Path(path)
    if path.is_dir():
        path = path / SCHEDULE_FILE
    if path.exists() and not overwrite:
        raise UserError(f"{path} exists; pass overwrite=True (bac calibrate: overwrite=true) to replace it.")
    try:
        text = json.dumps(schedule_to_dict(schedule), indent=1, allow_nan=False)
    except (TypeError, ValueError) as error:
        raise UserError(
            f"BAC schedule settings must be plain JSON values (str, int, finite float, bool, None, lists, "
            f"objects): {error}."
        ) from None
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text + "\n", encoding="utf-8")
    tmp.replace(path)  # readers never see half a file
    return path


def load_schedule(path: str | Path) -> BACSchedule:
    """Read a schedule file (or a directory holding ``bac_schedule.json``, e.g. a checkpoint)."""
    path = Path(path)
    if path.is_dir():
        path = path / SCHEDULE_FILE
    if not path.is_file():
        raise UserError(
            f"No BAC schedule at {path}. Run `dreamrt bac calibrate policy.path=CKPT` (copy_to_checkpoint=true "
            "stores it beside the weights) or pass the schedule file it wrote."
        )
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise UserError(f"{path} is not valid JSON ({error}); recalibrate or restore the file.") from None
    return schedule_from_dict(data, source=str(path))


# ---------------------------------------------------------------------------- the cache


class BlockCache:
    """The residual of every sub-block from its latest update step, for one sampling run (chunk).

    Sized from the schedule (N blocks); ``step`` is the sampler step the next denoiser call
    runs. Residuals are kept by reference: a block returns a fresh tensor each time it runs.
    """

    __slots__ = ("residuals", "step")

    def __init__(self, num_blocks: int):
        self.residuals: list[Tensor | None] = [None] * num_blocks  # (B, Ta, D) each once filled
        self.step = 0

    def reset(self) -> None:
        self.residuals = [None] * len(self.residuals)
        self.step = 0


class CachedDenoiser:
    """Wraps a sub-block denoiser with a :class:`BACSchedule`; calling it yields one chunk's denoiser.

    ``model`` is called as ``model(x_t, t, *conditioning, run_block=f)`` (DP-T's forward),
    with ``t`` a scalar tensor. Pass ``sampler`` to check the schedule against its timesteps
    up front; the denoiser checks every call's timestep anyway.
    """

    def __init__(self, model: nn.Module, schedule: BACSchedule, sampler: Any | None = None):
        check_schedule(schedule, model, sampler)
        self.model = model
        self.schedule = schedule
        self._table = schedule.update_table()  # (K, N) bools
        self._timesteps = schedule.timesteps
        self._t_tensors: dict[Any, list[Tensor]] = {}  # device -> K scalar timestep tensors

    def __call__(self, *conditioning: Tensor) -> Denoiser:
        """A fresh cache and ``denoise(x_t, t)`` for one sampling run with this conditioning."""
        return self.denoiser(BlockCache(self.schedule.num_blocks), *conditioning)

    def denoiser(self, cache: BlockCache, *conditioning: Tensor) -> Denoiser:
        """``denoise(x_t, t)`` over an explicit cache (reset here), e.g. to inspect it afterwards."""
        if len(cache.residuals) != self.schedule.num_blocks:
            raise UserError(
                f"This BlockCache holds {len(cache.residuals)} blocks; the schedule has {self.schedule.num_blocks}. "
                "Make it with BlockCache(schedule.num_blocks)."
            )
        cache.reset()
        model, table, timesteps = self.model, self._table, self._timesteps
        num_steps = len(timesteps)
        t_tensors: list[Tensor] | None = None

        def denoise(x: Tensor, t: int) -> Tensor:
            nonlocal t_tensors
            i = cache.step
            if i >= num_steps or int(t) != timesteps[i]:
                self._wrong_step(i, t)
            cache.step = i + 1
            update = table[i]
            residuals = cache.residuals

            def run_block(j: int, block: nn.Module, h: Tensor, memory: Tensor) -> Tensor:
                if update[j]:
                    r = residuals[j] = block(h, memory)
                    return r
                return residuals[j]

            if t_tensors is None:
                t_tensors = self._timestep_tensors(x.device)
            return model(x, t_tensors[i], *conditioning, run_block=run_block)

        return denoise

    def _timestep_tensors(self, device: Any) -> list[Tensor]:
        tensors = self._t_tensors.get(device)
        if tensors is None:
            import torch

            tensors = [torch.tensor(t, device=device) for t in self._timesteps]
            self._t_tensors[device] = tensors
        return tensors

    def _wrong_step(self, i: int, t: int) -> None:
        s = self.schedule
        if i >= s.num_steps:
            raise UserError(
                f"The sampler asked for a {i + 1}th denoiser call (timestep {t}), but the BAC schedule covers "
                f"{s.num_steps} steps. Call the CachedDenoiser again for each new sampling run."
            )
        raise UserError(
            f"At step {i} the sampler asked for timestep {t}, but the BAC schedule was calibrated for the "
            f"{s.num_steps}-step {s.sampler} sampler, which runs {s.timesteps[i]} there. Use that sampler or "
            "recalibrate for this one."
        )
