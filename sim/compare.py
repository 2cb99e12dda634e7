"""`dreamrt eval compare BASELINE CANDIDATE`: two evaluations of the same episodes, paired.

Every episode of `dreamrt eval` draws its chain, start state and seeds from its index alone
(docs/evaluation.md), so two runs with the same ``seed`` and ``mode`` play the same episodes and
differ only in what was changed between them (the policy, a sampler setting, ...). Pairing the
episodes removes the variance of which chains were drawn: the standard error of the change is
that of the per-episode differences, well below that of two independent averages' difference
(most chains end the same way in both runs).

Each side is a run directory of `dreamrt eval` (its ``episodes.jsonl``, so a run that is still
going or was interrupted compares on the episodes it has finished; or its ``results.json``), or
one of those two files. Only the episodes both runs finished are compared.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import MISSING

from dreamrt.errors import UserError
from dreamrt.jobs import JobResult
from dreamrt.sim.eval_log import LOG_FILE, read_episode_log
from dreamrt.sim.protocol import success_rates, task_counts

RESULTS_FILE = "results.json"


@dataclass
class CompareConfig:
    baseline: str = MISSING  # a `dreamrt eval` run directory, or its episodes.jsonl / results.json
    candidate: str = MISSING  # the same, for the run measured against the baseline
    show_tasks: int = 12  # per-task rows printed, largest change for its noise (|z|) first (0: none)

    def __post_init__(self) -> None:
        if self.show_tasks < 0:
            raise UserError(
                f"show_tasks={self.show_tasks}; expected how many task rows to print (0 for none)."
            )


@dataclass(frozen=True)
class EvalRun:
    """The finished episodes of one evaluation: index -> (tasks, subtasks completed)."""

    source: Path
    episodes: dict[int, tuple[tuple[str, ...], int]]
    settings: dict[str, Any] | None  # the outcome settings from episodes.jsonl; None from results.json


def load_run(path: str | Path) -> EvalRun:
    """Read one side of a comparison (see the module docstring)."""
    path = Path(path)
    if path.is_dir():
        if (path / LOG_FILE).is_file():
            path = path / LOG_FILE
        elif (path / RESULTS_FILE).is_file():
            path = path / RESULTS_FILE
        else:
            raise UserError(
                f"{path} holds neither {LOG_FILE} nor {RESULTS_FILE}; pass the --out directory of a `dreamrt eval` run."
            )
    elif not path.is_file():
        raise UserError(f"{path} does not exist; pass the --out directory of a `dreamrt eval` run.")
    if path.name == LOG_FILE or path.suffix == ".jsonl":
        settings, finished = read_episode_log(path)
        return EvalRun(path, {i: (e.tasks, e.num_success) for i, e in finished.items()}, settings)
    return EvalRun(path, _episodes_from_results(path), None)


def _episodes_from_results(path: Path) -> dict[int, tuple[tuple[str, ...], int]]:
    try:
        results = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise UserError(
            f"{path} is not JSON ({error}); expected the results.json of `dreamrt eval`."
        ) from None
    if not isinstance(results, dict) or not isinstance(results.get("chains"), list):
        detail = (
            " (a mode=tasks run: compare its episodes.jsonl)"
            if isinstance(results, dict) and "per_task" in results
            else ""
        )
        raise UserError(
            f"{path} has no per-chain results{detail}; expected the results.json of `dreamrt eval`."
        )
    episodes = {}
    try:
        for position, chain in enumerate(results["chains"]):
            # Runs before chains carried their index were complete runs, in index order.
            index = int(chain.get("index", position))
            episodes[index] = (tuple(str(t) for t in chain["tasks"]), int(chain["num_success"]))
    except (AttributeError, KeyError, TypeError, ValueError):
        raise UserError(f"{path}: chain {position} is not {{'tasks': [...], 'num_success': n}}.") from None
    return episodes


def compare_runs(baseline: EvalRun, candidate: EvalRun) -> dict[str, Any]:
    """The paired comparison of two runs on the episodes both finished (a JSON-ready dict)."""
    common = sorted(set(baseline.episodes) & set(candidate.episodes))
    if not common:
        raise UserError(
            f"{baseline.source} and {candidate.source} have no finished episode in common "
            f"({len(baseline.episodes)} and {len(candidate.episodes)} episodes)."
        )
    for i in common:
        if baseline.episodes[i][0] != candidate.episodes[i][0]:
            raise UserError(
                f"Episode {i} is {list(baseline.episodes[i][0])} in {baseline.source} and "
                f"{list(candidate.episodes[i][0])} in {candidate.source}: the runs did not play the same episodes. "
                "Compare evaluations with the same mode and seed."
            )
    before = [baseline.episodes[i][1] for i in common]
    after = [candidate.episodes[i][1] for i in common]
    diffs = [b - a for a, b in zip(before, after)]
    n = len(common)
    longest = max(len(baseline.episodes[i][0]) for i in common)
    return {
        "baseline": str(baseline.source),
        "candidate": str(candidate.source),
        "episodes": {"common": n, "baseline": len(baseline.episodes), "candidate": len(candidate.episodes)},
        "metric": "avg_len" if longest > 1 else "success",
        "baseline_mean": sum(before) / n,
        "candidate_mean": sum(after) / n,
        "baseline_se": _se(before),
        "candidate_se": _se(after),
        "difference": sum(diffs) / n,
        "paired_se": _se(diffs),
        # SR_k on the common episodes: the share that completed at least k subtasks.
        "baseline_sr": success_rates(before, longest),
        "candidate_sr": success_rates(after, longest),
        "longer": sum(d > 0 for d in diffs),
        "shorter": sum(d < 0 for d in diffs),
        "same": sum(d == 0 for d in diffs),
        "per_task": _per_task(
            [baseline.episodes[i] for i in common], [candidate.episodes[i] for i in common]
        ),
        "settings_changed": _changed_settings(baseline.settings, candidate.settings),
    }


def _se(values: list[int]) -> float | None:
    """The standard error of the mean (None for a single value)."""
    n = len(values)
    if n < 2:
        return None
    mean = sum(values) / n
    return math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1) / n)


def _per_task(before: list, after: list) -> dict[str, dict[str, Any]]:
    """Per task, attempts and successes in each run (protocol.task_counts) and the change's z."""
    sides = {side: task_counts(episodes) for side, episodes in (("baseline", before), ("candidate", after))}
    table: dict[str, dict[str, Any]] = {}
    for task in set(sides["baseline"]) | set(sides["candidate"]):
        row = {}
        for side, counts in sides.items():
            row[f"{side}_attempts"], row[f"{side}_successes"] = counts.get(task, (0, 0))
        row["z"] = _two_proportion_z(
            row["baseline_successes"],
            row["baseline_attempts"],
            row["candidate_successes"],
            row["candidate_attempts"],
        )
        table[task] = row
    return dict(sorted(table.items(), key=lambda kv: (-abs(kv[1]["z"]), kv[0])))


def _two_proportion_z(s1: int, n1: int, s2: int, n2: int) -> float:
    """The change in a task's success rate over its standard error under no change (0 when undefined)."""
    if n1 == 0 or n2 == 0:
        return 0.0
    pooled = (s1 + s2) / (n1 + n2)
    variance = pooled * (1 - pooled) * (1 / n1 + 1 / n2)
    return (s2 / n2 - s1 / n1) / math.sqrt(variance) if variance > 0 else 0.0


def _flatten(settings: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in settings.items():
        if isinstance(value, dict) and value:
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _changed_settings(before: dict | None, after: dict | None) -> dict[str, list[Any]] | None:
    """``{key: [baseline value, candidate value]}`` for the outcome settings that differ; None if unknown."""
    if before is None or after is None:
        return None
    a, b = _flatten(before), _flatten(after)
    return {k: [a.get(k), b.get(k)] for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)}


def format_comparison(c: dict[str, Any], show_tasks: int = 12) -> str:
    name = "avg len" if c["metric"] == "avg_len" else "success"
    e = c["episodes"]
    partial = (
        ""
        if e["common"] == e["baseline"] == e["candidate"]
        else (f" (finished: {e['baseline']} baseline, {e['candidate']} candidate)")
    )
    lines = [
        f"baseline   {c['baseline']}",
        f"candidate  {c['candidate']}",
        f"episodes   {e['common']} in common{partial}",
        f"{name:10s} {c['baseline_mean']:.3f} (s.e. {_num(c['baseline_se'])}) -> {c['candidate_mean']:.3f} "
        f"(s.e. {_num(c['candidate_se'])})",
        *(
            [f"SR1..SR{len(c['baseline_sr'])}   {_rates(c['baseline_sr'])} -> {_rates(c['candidate_sr'])}"]
            if c["metric"] == "avg_len"
            else []
        ),
        f"change     {c['difference']:+.3f}, paired s.e. {_num(c['paired_se'])}" + _interval(c),
        f"episodes   {c['longer']} better, {c['shorter']} worse, {c['same']} the same",
    ]
    changed = c["settings_changed"]
    if changed is None:
        lines.append("settings   unknown (a results.json side has no episode log)")
    elif not changed:
        lines.append("settings   the same")
    else:
        lines.append("settings changed:")
        lines += [f"  {k}: {v[0]!r} -> {v[1]!r}" for k, v in changed.items()]
    rows = list(c["per_task"].items())[:show_tasks]
    if rows:
        lines.append(f"{'task (largest |z| first)':34s} {'baseline':>16s} {'candidate':>16s} {'z':>6s}")
        for task, r in rows:
            lines.append(
                f"  {task:32s} {_rate(r['baseline_successes'], r['baseline_attempts']):>16s} "
                f"{_rate(r['candidate_successes'], r['candidate_attempts']):>16s} {r['z']:+6.2f}"
            )
    return "\n".join(lines)


def _num(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def _interval(c: dict[str, Any]) -> str:
    if c["paired_se"] is None:
        return ""
    low, high = c["difference"] - 1.96 * c["paired_se"], c["difference"] + 1.96 * c["paired_se"]
    return f"  (95%: {low:+.3f} .. {high:+.3f})"


def _rates(values: list[float]) -> str:
    return " / ".join(f"{v:.3f}" for v in values)


def _rate(successes: int, attempts: int) -> str:
    if attempts == 0:
        return "-"
    return f"{successes}/{attempts} {successes / attempts:.2f}"


def run(cfg: CompareConfig, out_dir: Path | None = None) -> JobResult:
    comparison = compare_runs(load_run(cfg.baseline), load_run(cfg.candidate))
    print(format_comparison(comparison, cfg.show_tasks))
    return JobResult(summary=comparison)
