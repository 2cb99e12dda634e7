"""`dreamrt eval`: CALVIN's long-horizon evaluation of a policy in the CALVIN-style scene.

    dreamrt eval [policy=expert|random | policy.path=CKPT] [num_chains=1000] [num_workers=2]
                 [env.scene=D] [videos=3] [video_format=gif|mp4] [resume=true] [--json PATH] [--out DIR]

The protocol (``docs/calvin_protocol.md``, ``docs/evaluation.md``): ``num_chains`` chains from
``protocol.generate_chains(num_chains, seed)``; each chain resets the scene once into its
symbolic start state (seeded by the chain's index), then asks for its five tasks in order with
their evaluation instructions, no reset in between; a subtask gets up to
``max_steps_per_subtask`` steps and succeeds the first step its check fires; the chain stops
at the first failure. Rollouts run in ``num_workers`` processes (:mod:`dreamrt.sim.rollout`).

Writes into the run directory: ``results.json`` (the summary below), ``per_task.png`` and
``videos/chain_<i>.<fmt>`` for the first ``videos`` chains. The summary is
:func:`dreamrt.sim.protocol.summarize`'s dict (avg_len, sr, per_task, num_chains, chains) plus
``failures``, ``wall_time_s``, ``env_steps``, ``steps_per_s``, ``interrupted``,
``resumed_episodes`` and ``artifacts``; and ``episodes.jsonl``, each finished episode as it ends
(:mod:`dreamrt.sim.eval_log`). Ctrl-C or SIGTERM stops the rollouts and writes the chains that
finished (``interrupted: true``, exit code 130); ``resume=true`` with the same ``--out DIR``
runs the rest.

``failures`` (:func:`summarize_failures`) says how subtasks failed: while a subtask runs, the
other 33 tasks are checked too, so a failure either achieved another task (the policy
confused the instruction: ``lift_red_block_table`` lifting the blue block) or none (it went
for the right thing and fumbled it, or did nothing the task list recognises).
"""

from __future__ import annotations

import json
import signal
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from dreamrt.errors import UserError, choose
from dreamrt.jobs import JobResult
from dreamrt.policies.factory import PolicyConfig
from dreamrt.sim.env import CONTROL_HZ, EnvConfig
from dreamrt.sim.eval_log import EpisodeLog, FinishedEpisode, open_episode_log

EXIT_INTERRUPTED = 130
EVAL_MODES = ("chains", "tasks")
INSTRUCTION_SETS = ("eval", "train")
VIDEO_HOLD_FRAMES = 15  # the last frame repeats so the outcome stays readable


@dataclass
class EvalConfig:
    env: EnvConfig = field(default_factory=EnvConfig)  # the scene (D for CALVIN's evaluation) and its cameras
    policy: PolicyConfig = field(default_factory=PolicyConfig)  # policy=expert|random or policy.path=DIR
    # chains: CALVIN's protocol. tasks: single-task rollouts, episodes_per_task for each of the 34
    # tasks, each from a reset into a random protocol-reachable state where the task is allowed.
    mode: str = "chains"
    num_chains: int = 1000  # CALVIN evaluates 1000 chains of 5 tasks
    episodes_per_task: int = 20  # mode=tasks
    # mode=tasks: only these tasks (null: all 34). Each keeps the episodes, start states and seeds it
    # has in the full set, so a filtered run repeats those episodes of a full one exactly.
    tasks: list[str] | None = None
    seed: int = 0  # chain generation, and the per-chain env and policy seeds
    max_steps_per_subtask: int = 360
    # What the policy is told. eval: CALVIN's protocol, the one held-out instruction per task.
    # train: a training paraphrase instead, drawn per subtask from (seed, episode, subtask); the
    # gap between the two is how much the unseen wording costs (not a protocol result).
    instructions: str = "eval"
    num_workers: int = 2  # rollout processes (0: run in this process)
    # Observation images: null = only when the policy reads images (or env.depth/segmentation is on).
    cameras: bool | None = None
    videos: int = 3  # film the first N chains (static camera, instruction drawn on the frames)
    video_format: str = "gif"  # gif | mp4 (mp4 needs imageio-ffmpeg)
    video_width: int = 288  # pixels; the static camera image is upscaled to this
    video_stride: int = 2  # keep every n-th control step in videos (played back at 30 Hz / n)
    progress: bool = True  # tqdm bar over chains
    # Continue the interrupted evaluation in --out DIR: its finished episodes are read from
    # DIR/episodes.jsonl and only the others run (the settings must be the same; sim/eval_log.py).
    resume: bool = False

    def __post_init__(self) -> None:
        from dreamrt.sim.video import check_video_format

        choose("evaluation mode", self.mode, EVAL_MODES)
        choose("instructions", self.instructions, INSTRUCTION_SETS)
        if self.episodes_per_task < 1:
            raise UserError(f"episodes_per_task={self.episodes_per_task}; expected a positive int.")
        if self.num_chains < 1:
            raise UserError(f"num_chains={self.num_chains}; expected a positive int (CALVIN uses 1000).")
        if self.seed < 0:
            raise UserError(f"seed={self.seed}; expected a non-negative int.")
        if self.max_steps_per_subtask < 1:
            raise UserError(
                f"max_steps_per_subtask={self.max_steps_per_subtask}; expected a positive int (CALVIN: 360)."
            )
        if self.num_workers < 0:
            raise UserError(
                f"num_workers={self.num_workers}; expected 0 (in this process) or a positive int."
            )
        if self.videos < 0:
            raise UserError(f"videos={self.videos}; expected how many chains to film (0 for none).")
        check_video_format(self.video_format)
        if self.tasks is not None:
            from dreamrt.sim.tasks import get_task

            if self.mode != "tasks":
                raise UserError(
                    f"tasks={list(self.tasks)} picks single-task rollouts; it needs mode=tasks (the chains of "
                    "mode=chains follow CALVIN's protocol and cannot be filtered)."
                )
            if not self.tasks:
                raise UserError("tasks=[] names no task; give task names or tasks=null for all 34.")
            for task in self.tasks:
                get_task(task)  # a UserError with "did you mean" for a misspelt task
        if not 64 <= self.video_width <= 1920:
            raise UserError(f"video_width={self.video_width}; expected 64..1920 pixels.")
        if self.video_stride < 1:
            raise UserError(f"video_stride={self.video_stride}; expected a positive int.")


def policy_factory(policy_cfg: PolicyConfig, env_cfg: EnvConfig, expert_noise=None):
    """A picklable no-argument callable that builds one instance of the configured policy for
    this env (worker processes call it to build their own)."""
    import functools

    from dreamrt.policies.factory import make_policy

    return functools.partial(
        make_policy,
        policy_cfg,
        action_dim=7,
        rate_hz=CONTROL_HZ,
        scene=env_cfg.scene,
        expert_noise=expert_noise,
        action_mode=env_cfg.action_mode,
    )


def build_policies(policy_cfg: PolicyConfig, env_cfg: EnvConfig, count: int, expert_noise=None) -> list:
    """``count`` independent instances of the configured policy (one per sub-environment)."""
    build = policy_factory(policy_cfg, env_cfg, expert_noise)
    return [build() for _ in range(count)]


def resolve_env_config(env_cfg: EnvConfig, cameras: bool | None, policy) -> EnvConfig:
    """The env config with ``cameras`` decided: forced by the caller, or on iff the policy reads images."""
    from dreamrt.sim.rollout import policy_image_keys

    wants_images = bool(policy_image_keys(policy))
    if cameras is None:
        cameras = wants_images or env_cfg.depth or env_cfg.segmentation
    if wants_images and not cameras:
        raise UserError(
            f"The policy reads images {policy_image_keys(policy)} but cameras=false. Leave cameras unset (auto) "
            "or set cameras=true."
        )
    return replace(env_cfg, cameras=bool(cameras))


def instruction_for(task: str, instructions: str, seed: int, episode: int, subtask: int) -> str:
    """What the policy is told for ``task``: its evaluation instruction, or (``instructions="train"``)
    a training paraphrase drawn from (seed, episode, subtask)."""
    from dreamrt.sim.language import eval_instruction, sample_instruction

    if instructions == "eval":
        return eval_instruction(task)
    return sample_instruction(task, np.random.default_rng([seed, episode, subtask]))


def chain_specs(chains: list, seed: int, films: int, instructions: str = "eval") -> list:
    """EpisodeSpecs for evaluation chains: evaluation instructions, seeds from (seed, chain index)."""
    from dreamrt.sim.rollout import EpisodeSpec, derive_seed

    return [
        EpisodeSpec(
            index=i,
            start_state=chain.start_state,
            tasks=chain.tasks,
            instructions=tuple(
                instruction_for(t, instructions, seed, i, k) for k, t in enumerate(chain.tasks)
            ),
            env_seed=derive_seed(seed, i, 0),
            policy_seeds=tuple(derive_seed(seed, i, 1 + k) for k in range(len(chain.tasks))),
            film=i < films,
        )
        for i, chain in enumerate(chains)
    ]


def task_specs(episodes_per_task: int, seed: int, films: int, instructions: str = "eval") -> list:
    """EpisodeSpecs for single-task rollouts: for each task, random reachable states that allow it."""
    from dreamrt.sim import protocol
    from dreamrt.sim.rollout import EpisodeSpec, derive_seed
    from dreamrt.sim.tasks import task_names

    specs = []
    for t, task in enumerate(task_names()):
        states = protocol.states_for(task)
        rng = np.random.default_rng([seed, t])
        for _ in range(episodes_per_task):
            i = len(specs)
            specs.append(
                EpisodeSpec(
                    index=i,
                    start_state=states[int(rng.integers(len(states)))],
                    tasks=(task,),
                    instructions=(instruction_for(task, instructions, seed, i, 0),),
                    env_seed=derive_seed(seed, i, 0),
                    policy_seeds=(derive_seed(seed, i, 1),),
                    film=i < films,
                )
            )
    return specs


def evaluate(cfg: EvalConfig, out_dir: Path | None) -> tuple[dict[str, Any], bool]:
    """Run the evaluation; returns (summary, interrupted). Writes artifacts when ``out_dir`` is set."""
    from tqdm import tqdm

    from dreamrt.sim import protocol
    from dreamrt.sim.rollout import run_episodes

    if cfg.mode == "chains":
        films = min(cfg.videos, cfg.num_chains) if out_dir is not None else 0
        specs = chain_specs(
            protocol.generate_chains(cfg.num_chains, cfg.seed), cfg.seed, films, cfg.instructions
        )
    else:
        films = cfg.videos if out_dir is not None else 0
        specs = task_specs(cfg.episodes_per_task, cfg.seed, films=0, instructions=cfg.instructions)
        if cfg.tasks:
            specs = [s for s in specs if s.tasks[0] in cfg.tasks]
        specs = [replace(s, film=n < films) for n, s in enumerate(specs)]
    policies = build_policies(cfg.policy, cfg.env, max(1, cfg.num_workers))
    env_cfg = resolve_env_config(cfg.env, cfg.cameras, policies[0])
    log = _episode_log(cfg, out_dir, specs)
    finished = log.finished if log is not None else {}
    results: dict[int, tuple[tuple[str, ...], int]] = {
        i: (e.tasks, e.num_success) for i, e in finished.items()
    }
    # episode -> other tasks done during its failed subtask
    instead: dict[int, tuple[str, ...]] = {i: e.other_tasks for i, e in finished.items()}
    videos: dict[int, list] = {}
    earlier_steps = sum(e.steps for e in finished.values())
    steps = earlier_steps
    specs = [s for s in specs if s.index not in finished]
    bar = tqdm(
        total=len(specs) + len(finished),
        initial=len(finished),
        unit="episode",
        desc="eval",
        disable=not cfg.progress,
    )

    def on_outcome(outcome) -> None:
        i = outcome.spec.index
        results[i] = (outcome.spec.tasks, outcome.num_success)
        instead[i] = outcome.other_tasks_of_failure
        if log is not None:
            log.append(
                FinishedEpisode(
                    i, outcome.spec.tasks, outcome.num_success, outcome.other_tasks_of_failure, outcome.steps
                )
            )
        if outcome.video is not None:
            videos[i] = outcome.video
        bar.update(1)
        mean = sum(done for _, done in results.values()) / len(results)
        bar.set_postfix({"avg_len" if cfg.mode == "chains" else "success": f"{mean:.2f}"})

    def on_step(n: int) -> None:
        nonlocal steps
        steps += n

    interrupted = False
    start = time.perf_counter()
    try:
        with _sigterm_as_interrupt():
            run_episodes(  # nothing left when a finished evaluation is resumed: it only writes its results
                specs,
                policies,
                env_cfg,
                num_workers=cfg.num_workers,
                max_steps_per_subtask=cfg.max_steps_per_subtask,
                video=any(s.film for s in specs),
                watch_other_tasks=True,
                on_outcome=on_outcome,
                on_step=on_step,
            )
    except KeyboardInterrupt:
        interrupted = True
    finally:
        bar.close()
        if log is not None:
            log.close()
    wall = time.perf_counter() - start

    if not results:
        summary: dict[str, Any] = {"num_chains": 0, "chains": []}
    else:
        # In episode order, not completion order, so the output does not depend on the workers.
        ordered = [results[i] for i in sorted(results)]
        if cfg.mode == "chains":
            summary = protocol.summarize([protocol.ChainResult(tasks, done) for tasks, done in ordered])
            # The chain's index in generate_chains order: runs that stopped early pair up by it.
            for index, chain in zip(sorted(results), summary["chains"]):
                chain["index"] = index
        else:
            summary = summarize_tasks(ordered)
        summary["failures"] = summarize_failures(
            [(tasks, done, instead[i]) for i, (tasks, done) in sorted(results.items())]
        )
    summary.update(
        instructions=cfg.instructions,
        wall_time_s=wall,
        env_steps=steps,
        steps_per_s=(steps - earlier_steps) / wall if wall > 0 else 0.0,  # this run's
        interrupted=interrupted,
        resumed_episodes=len(finished),
    )
    if out_dir is not None:
        summary["artifacts"] = write_artifacts(cfg, summary, videos, Path(out_dir))
    return summary, interrupted


def _episode_log(cfg: EvalConfig, out_dir: Path | None, specs: list) -> EpisodeLog | None:
    """The run directory's episode log (None without one), its finished episodes checked against ``specs``."""
    if out_dir is None:
        if cfg.resume:
            raise UserError("resume=true continues the evaluation in --out DIR; pass that directory.")
        return None
    log = open_episode_log(Path(out_dir), cfg, cfg.resume)
    by_index = {s.index: s for s in specs}
    for i, episode in log.finished.items():
        if i not in by_index or by_index[i].tasks != episode.tasks:
            log.close()
            raise UserError(
                f"{log.path} names episode {i} with tasks {list(episode.tasks)}, which this evaluation does not have "
                "(it was written by another version of dreamrt's protocol); it cannot be resumed."
            )
    return log


@contextmanager
def _sigterm_as_interrupt():
    """SIGTERM (``kill``, a job scheduler, ``timeout``) stops the rollouts the way Ctrl-C does."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def summarize_tasks(results: list[tuple[tuple[str, ...], int]]) -> dict[str, Any]:
    """Single-task rollouts, as (tasks, successes) pairs: success per task, their mean, the weakest."""
    attempts: dict[str, list[int]] = {}
    for tasks, done in results:
        attempts.setdefault(tasks[0], []).append(done)
    per_task = {task: float(np.mean(done)) for task, done in attempts.items()}
    weakest = min(per_task, key=per_task.get)
    return {
        "mode": "tasks",
        "per_task": per_task,
        "mean_success": float(np.mean(list(per_task.values()))),
        "min_task": {"task": weakest, "success": per_task[weakest]},
        "num_episodes": len(results),
        "episodes_per_task": {task: len(done) for task, done in attempts.items()},
    }


def summarize_failures(results: list[tuple[tuple[str, ...], int, tuple[str, ...]]]) -> dict[str, Any]:
    """How subtasks failed, from (tasks, successes, other tasks done during the failed subtask)
    triples: ``{"failed": n, "did_another_task": k, "by_task": {task: {"failed", "did_another_task",
    "instead": {other: count}}}, "confusions": [[task, other, count], ...]}`` (most frequent
    first). An episode whose every subtask succeeded did not fail."""
    by_task: dict[str, dict[str, Any]] = {}
    pairs: dict[tuple[str, str], int] = {}
    for tasks, done, others in results:
        if done >= len(tasks):
            continue
        entry = by_task.setdefault(tasks[done], {"failed": 0, "did_another_task": 0, "instead": {}})
        entry["failed"] += 1
        entry["did_another_task"] += bool(others)
        for other in others:
            entry["instead"][other] = entry["instead"].get(other, 0) + 1
            pairs[tasks[done], other] = pairs.get((tasks[done], other), 0) + 1
    order = sorted(pairs.items(), key=lambda kv: (-kv[1], kv[0]))
    return {
        "failed": sum(e["failed"] for e in by_task.values()),
        "did_another_task": sum(e["did_another_task"] for e in by_task.values()),
        "by_task": dict(sorted(by_task.items(), key=lambda kv: -kv[1]["failed"])),
        "confusions": [[task, other, count] for (task, other), count in order],
    }


def write_artifacts(cfg: EvalConfig, summary: dict, videos: dict[int, list], out_dir: Path) -> dict[str, Any]:
    """results.json, per_task.png and the videos; returns their paths."""
    from dreamrt.sim.protocol import CHAIN_LENGTH
    from dreamrt.sim.video import caption_frame, per_task_chart, write_video

    out_dir.mkdir(parents=True, exist_ok=True)
    artifacts: dict[str, Any] = {"results": str(out_dir / "results.json"), "chart": None, "videos": []}
    if summary.get("per_task") and cfg.mode == "tasks":
        attempts = summary["episodes_per_task"]
        title = (
            f"{_policy_name(cfg.policy)} on scene {cfg.env.scene}: single-task rollouts, "
            f"mean success {summary['mean_success']:.2f}"
        )
    elif summary.get("per_task"):
        attempts = {}
        for chain in summary["chains"]:
            for task in chain["tasks"][: chain["num_success"] + 1]:
                attempts[task] = attempts.get(task, 0) + 1
        title = (
            f"{_policy_name(cfg.policy)} on scene {cfg.env.scene}: {summary['num_chains']} chains, "
            f"avg len {summary['avg_len']:.2f}, SR " + " ".join(f"{s:.2f}" for s in summary["sr"])
        )
    if summary.get("per_task"):
        artifacts["chart"] = str(
            per_task_chart(out_dir / "per_task.png", summary["per_task"], attempts, title)
        )
    for i in sorted(videos):
        frames = videos[i]
        n = CHAIN_LENGTH if cfg.mode == "chains" else 1
        rendered = []
        for t, (frame, instruction, done) in enumerate(frames):
            last = t == len(frames) - 1
            if t % cfg.video_stride and not last:
                continue
            if last:  # how the chain ended, held on screen for a second
                status = f"all {n} done" if done == n else f"{done} done, task {done + 1} failed"
                header = f"chain {i}  task {min(done + 1, n)}/{n}"
                rendered += [
                    caption_frame(frame, header, instruction, cfg.video_width, status)
                ] * VIDEO_HOLD_FRAMES
            else:
                header = f"chain {i}  task {done + 1}/{n}"
                rendered.append(
                    caption_frame(frame, header, instruction, cfg.video_width, f"{done} done" if done else "")
                )
        fps = CONTROL_HZ / cfg.video_stride
        path = write_video(out_dir / "videos" / f"chain_{i:03d}", rendered, fps, cfg.video_format)
        artifacts["videos"].append(str(path))
    (out_dir / "results.json").write_text(json.dumps({**summary, "artifacts": artifacts}, indent=2) + "\n")
    return artifacts


def _policy_name(policy: PolicyConfig) -> str:
    return policy.path if policy.path else policy.name


def run(cfg: EvalConfig, out_dir: Path | None = None) -> JobResult:
    summary, interrupted = evaluate(cfg, out_dir)
    print(format_summary(summary))
    return JobResult(summary=summary, exit_code=EXIT_INTERRUPTED if interrupted else 0)


def format_summary(summary: dict) -> str:
    """A few lines: SR_1..SR_5 and average length (or per-task success), speed, where things were written."""
    if summary.get("mode") == "tasks":
        weakest = summary["min_task"]
        lines = [
            f"{summary['num_episodes']} single-task episodes over {len(summary['per_task'])} tasks",
            f"mean success {summary['mean_success']:.3f}; weakest {weakest['task']} {weakest['success']:.3f}",
        ]
        lines += [f"  {task:28s} {rate:.3f}" for task, rate in summary["per_task"].items()]
        lines.append(
            f"{summary['env_steps']} env steps in {summary['wall_time_s']:.1f} s ({summary['steps_per_s']:.0f} steps/s)"
        )
    elif not summary.get("num_chains"):
        return "no chain finished"
    else:
        lines = [
            f"{summary['num_chains']} chains{' (interrupted: finished chains only)' if summary.get('interrupted') else ''}",
            "SR1..SR5: "
            + "  ".join(f"{s:.3f}" for s in summary["sr"])
            + f"   avg len: {summary['avg_len']:.3f}",
            f"{summary['env_steps']} env steps in {summary['wall_time_s']:.1f} s ({summary['steps_per_s']:.0f} steps/s)",
        ]
    if summary.get("instructions") == "train":
        lines.insert(0, "told training paraphrases, not the evaluation instructions: not CALVIN's protocol")
    failures = summary.get("failures")
    if failures and failures["failed"]:
        lines.append(
            f"failed subtasks: {failures['failed']}, of which {failures['did_another_task']} did another task instead"
        )
        top = failures["confusions"][:5]
        if top:
            lines.append("  most often: " + "; ".join(f"{t} -> {o} ({n})" for t, o, n in top))
    art = summary.get("artifacts")
    if art:
        lines.append(f"results: {art['results']}")
        if art.get("chart"):
            lines.append(f"per-task chart: {art['chart']}")
        for v in art.get("videos", []):
            lines.append(f"video: {v}")
    return "\n".join(lines)
