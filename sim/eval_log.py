"""The episode log of `dreamrt eval`, so that an interrupted evaluation resumes where it stopped.

``<run dir>/episodes.jsonl`` holds one JSON object per line:

- first, ``{"dreamrt_eval_log": 1, "config": {...}}``: the evaluation settings that decide an
  episode's outcome (:func:`outcome_settings`);
- then one line per finished episode, ``{"index", "tasks", "num_success", "other_tasks",
  "steps"}``, appended and flushed as the episode ends.

Each episode's seeds come from its index alone (``docs/evaluation.md``), so running the missing
episodes later gives the outcomes an uninterrupted run would have. A run killed outright
(SIGKILL, a lost machine) keeps every episode that finished; a last line cut mid-write is
dropped when the log is read.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import IO, Any

from dreamrt.errors import UserError

LOG_FILE = "episodes.jsonl"
LOG_VERSION = 1
# Settings that change how an evaluation runs or what it films, never an episode's outcome, so
# a resumed run may differ in them.
FREE_ON_RESUME = (
    "num_workers",
    "progress",
    "resume",
    "videos",
    "video_format",
    "video_width",
    "video_stride",
)


@dataclass(frozen=True)
class FinishedEpisode:
    index: int
    tasks: tuple[str, ...]
    num_success: int
    other_tasks: tuple[str, ...]  # the tasks its failed subtask did instead (see ChainEnv)
    steps: int


def outcome_settings(cfg: Any) -> dict[str, Any]:
    """The evaluation config (a dataclass) as JSON values, without the keys in FREE_ON_RESUME."""
    settings = {k: v for k, v in asdict(cfg).items() if k not in FREE_ON_RESUME}
    return json.loads(json.dumps(settings))


class EpisodeLog:
    """Appends finished episodes to ``<run dir>/episodes.jsonl``; see :func:`open_episode_log`."""

    def __init__(self, path: Path, file: IO[str], finished: dict[int, FinishedEpisode]):
        self.path = path
        self.finished = finished  # read from an earlier run (empty for a new log)
        self._file = file

    def append(self, episode: FinishedEpisode) -> None:
        record = {
            "index": episode.index,
            "tasks": list(episode.tasks),
            "num_success": episode.num_success,
            "other_tasks": list(episode.other_tasks),
            "steps": episode.steps,
        }
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()


def open_episode_log(run_dir: Path, cfg: Any, resume: bool) -> EpisodeLog:
    """Start the log in ``run_dir``, or with ``resume`` continue the one there.

    A new log refuses a run directory that already holds one (resume it or pick another
    directory); a resumed log must have been written with the same outcome settings.
    """
    path = Path(run_dir) / LOG_FILE
    settings = outcome_settings(cfg)
    if not resume:
        if path.exists() and _read(path)[1]:
            raise UserError(
                f"{run_dir} already holds an evaluation ({LOG_FILE}). Continue it with resume=true and the same "
                "settings, or pass another --out DIR."
            )
        path.parent.mkdir(parents=True, exist_ok=True)
        file = path.open("w")
        file.write(json.dumps({"dreamrt_eval_log": LOG_VERSION, "config": settings}) + "\n")
        file.flush()
        return EpisodeLog(path, file, {})
    if not path.is_file():
        raise UserError(
            f"resume=true continues the evaluation whose {LOG_FILE} is in --out DIR, and {run_dir} has none. "
            "Pass the run directory of the interrupted evaluation as --out, or drop resume=true."
        )
    saved, finished, complete_bytes = _read(path)
    changed = sorted(k for k in set(saved) | set(settings) if saved.get(k) != settings.get(k))
    if changed:
        details = "; ".join(f"{k}: {saved.get(k)!r} then, {settings.get(k)!r} now" for k in changed)
        raise UserError(
            f"The evaluation in {run_dir} ran with other settings ({details}). A resumed evaluation must repeat "
            f"them; only {', '.join(FREE_ON_RESUME)} may change."
        )
    file = path.open("r+")
    file.truncate(complete_bytes)  # drop a line cut mid-write, so appends start on a fresh line
    file.seek(complete_bytes)
    return EpisodeLog(path, file, finished)


def read_episode_log(path: str | Path) -> tuple[dict[str, Any], dict[int, FinishedEpisode]]:
    """(outcome settings, finished episodes by index) of an episode log, e.g. of a running evaluation."""
    settings, finished, _ = _read(Path(path))
    return settings, finished


def _read(path: Path) -> tuple[dict[str, Any], dict[int, FinishedEpisode], int]:
    """(settings, finished episodes by index, bytes up to the last complete line)."""
    data = path.read_bytes()
    complete = data[: data.rfind(b"\n") + 1]
    lines = complete.decode().splitlines()
    try:
        header = json.loads(lines[0]) if lines else None
    except json.JSONDecodeError:
        header = None
    if not isinstance(header, dict) or header.get("dreamrt_eval_log") != LOG_VERSION:
        raise UserError(
            f"{path} is not an episode log of `dreamrt eval` (version {LOG_VERSION}); it cannot be resumed."
        )
    finished: dict[int, FinishedEpisode] = {}
    for number, line in enumerate(lines[1:], start=2):
        try:
            r = json.loads(line)
            episode = FinishedEpisode(
                int(r["index"]),
                tuple(r["tasks"]),
                int(r["num_success"]),
                tuple(r["other_tasks"]),
                int(r["steps"]),
            )
        except (json.JSONDecodeError, KeyError, TypeError, ValueError):
            raise UserError(f"{path}, line {number}, is not a finished episode: {line[:120]!r}.") from None
        finished[episode.index] = episode
    return header["config"], finished, len(complete)
