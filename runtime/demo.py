"""`dreamrt demo`: the shipped policy on CALVIN-style chains in MuJoCo, under the real-time control loop.

    dreamrt demo [policy.path=DIR | policy=expert] [chains=8] [videos=1] [loop.mode=real|virtual]
                 [loop.scheduler.strategy=rtc|sync|naive_async|temporal_ensemble] [--json PATH] [--out DIR]

The default policy is the checkpoint shipped with dreamrt (``shipped:dpt_state_cm``: a
consistency-distilled DP-T student on state observations, sampled in one step with the
sampler it was saved with, the fastest there is). The demo draws ``chains`` evaluation
chains (``dreamrt eval``'s: :func:`dreamrt.sim.protocol.generate_chains`, evaluation
instructions, per-chain seeds) and runs each one under :func:`dreamrt.runtime.loop.run_loop`
at 30 Hz on the wall clock (:mod:`dreamrt.runtime.chains`: one loop per subtask, at most
``loop.max_ticks`` = 360 control steps, the chain stops at the first failure), with inference
on its own thread and real-time chunking (``rtc``) merging the chunks. A policy that returns
one action per call (the scripted expert) runs ``sync`` instead: no asynchronous strategy can
run ahead of a one-action plan.

It prints SR1..SR5 and the average length, and a latency table over every tick of every
chain (inference latency per chunk, tick jitter, the tick's own work, observation age:
p50 / p99 / max; deadline misses, held ticks). It writes into the run directory:
``video.<fmt>`` (the first ``videos`` chains, static camera, the instruction and the latest
inference latency drawn on the frames), ``latency.png`` (per-chunk inference latency over
the run and its histogram, against the 33 ms tick budget) and ``results.json`` (the summary).

Time. A chain runs at most 5 x 360 ticks / 30 Hz = 60 s (every subtask succeeding on its last
tick); one whose first subtask times out takes 12 s. Before each chain the demo checks that a
worst-case chain still ends within ``time_budget_s`` of the start (set-up included) and
otherwise stops there (``chains_skipped``), so a real-time run ends within the budget plus the
time to write the video (a few seconds). Virtual mode (``loop.mode=virtual``) runs as fast as
the policy and the physics compute, deterministically, with no budget check.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from dreamrt.errors import UserError
from dreamrt.jobs import JobResult
from dreamrt.policies.factory import PolicyConfig
from dreamrt.policies.shipped import shipped_path
from dreamrt.runtime.chunking import SchedulerConfig
from dreamrt.runtime.loop import LoopConfig, loop_for_policy, realtime_or_normal
from dreamrt.runtime.metrics import Percentiles, TickRecord
from dreamrt.sim.env import EnvConfig

SHIPPED_POLICY = "dpt_state_cm"
EXIT_INTERRUPTED = 130
WARMUP_CALLS = 3  # untimed policy calls before the first chain (first torch calls are slow)
STATUS_EVERY_S = 0.5  # wall seconds between refreshes of the progress line (drawn on the loop thread)


@dataclass
class DemoConfig:
    # The shipped checkpoint; policy.path=DIR for another one, policy=expert|random for a built-in.
    policy: PolicyConfig = field(default_factory=lambda: PolicyConfig(path=shipped_path(SHIPPED_POLICY)))
    env: EnvConfig = field(default_factory=EnvConfig)  # the scene (D: CALVIN's evaluation scene)
    # loop.max_ticks is the limit per subtask (CALVIN: 360 steps). rtc suits chunking policies; a
    # one-action policy (the expert) is run sync whatever is set here. realtime_priority: the loop
    # and inference threads under SCHED_FIFO where permitted (else one note, normal scheduling).
    loop: LoopConfig = field(
        default_factory=lambda: LoopConfig(
            max_ticks=360, realtime_priority=10, scheduler=SchedulerConfig(strategy="rtc")
        )
    )
    # Budget (see the module docstring). Measured on the loaded 2-core machine: 8 chains whose first
    # subtask fails take 112 s in all (96 s of loop, 5 s set-up), 8 expert chains (avg len 5) 112 s.
    # A worst-case chain is 60 s: with 240 s and up to 15 s of set-up at least 3 chains always run,
    # and the demo ends within 240 s + writing the video (~1 s), under 5 minutes.
    chains: int = 8
    time_budget_s: float = 240.0  # real mode: start no chain that could end later than this after the start
    seed: int = 0  # chain generation, scene resets and policy sampling (as `dreamrt eval`)
    videos: int = 1  # film the first N chains into one video (0: none)
    video_format: str = "mp4"  # mp4 | gif
    video_width: int = 288  # pixels; the 96x96 static camera is upscaled to this
    video_stride: int = 2  # keep every n-th control step (played back at 30 Hz / n: real speed)
    cameras: bool | None = None  # observation images: null = only when the policy reads them
    threads: int | None = 1  # torch threads for a checkpoint policy without policy.threads (null: torch's)
    progress: bool = True  # live progress line

    def __post_init__(self) -> None:
        from dreamrt.sim.video import check_video_format

        if isinstance(self.chains, bool) or not isinstance(self.chains, int) or self.chains < 1:
            raise UserError(f"chains={self.chains!r}; expected a positive int (e.g. 8).")
        if not (math.isfinite(self.time_budget_s) and self.time_budget_s > 0):
            raise UserError(f"time_budget_s={self.time_budget_s!r}; expected seconds > 0 (e.g. 240).")
        if self.seed < 0:
            raise UserError(f"seed={self.seed}; expected a non-negative int.")
        if self.videos < 0:
            raise UserError(f"videos={self.videos}; expected how many chains to film (0 for none).")
        check_video_format(self.video_format)
        if not 64 <= self.video_width <= 1920:
            raise UserError(f"video_width={self.video_width}; expected 64..1920 pixels.")
        if self.video_stride < 1:
            raise UserError(f"video_stride={self.video_stride}; expected a positive int.")
        if self.threads is not None and self.threads < 1:
            raise UserError(f"threads={self.threads}; expected a positive int or null (torch's default).")


def policy_label(cfg: PolicyConfig) -> str:
    return cfg.path if cfg.path is not None else cfg.name


def run(cfg: DemoConfig, out_dir: Path | None = None) -> JobResult:
    from dreamrt.policies.factory import make_policy
    from dreamrt.policies.shipped import resolve_policy_path
    from dreamrt.runtime.chains import chain_robot
    from dreamrt.runtime.clock import make_clock
    from dreamrt.sim import protocol
    from dreamrt.sim.env import CONTROL_HZ
    from dreamrt.sim.evaluate import chain_specs, resolve_env_config
    from dreamrt.sim.rollout import ChainEnv, check_policy_fits

    start = time.perf_counter()
    policy_cfg = replace(cfg.policy, path=resolve_policy_path(cfg.policy.path))
    if out_dir is None:  # called outside the CLI: still leave the video somewhere to look at
        out_dir = Path(tempfile.mkdtemp(prefix="dreamrt_demo_"))
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    print(
        f"dreamrt demo: {policy_label(cfg.policy)} on {cfg.chains} CALVIN-style chains in scene {cfg.env.scene}, "
        f"under the {cfg.loop.mode}-time loop at {cfg.loop.rate_hz:g} Hz",
        flush=True,
    )
    saved_threads = _set_threads(policy_cfg, cfg.threads)
    env = None
    try:
        policy = make_policy(policy_cfg, action_dim=7, rate_hz=CONTROL_HZ, scene=cfg.env.scene)
        check_policy_fits(policy, cfg.env)
        loop_cfg = loop_for_policy(cfg.loop, policy.spec.horizon)
        loop_cfg = realtime_or_normal(loop_cfg)
        env_cfg = resolve_env_config(cfg.env, cfg.cameras, policy)
        films = min(cfg.videos, cfg.chains)
        specs = chain_specs(protocol.generate_chains(cfg.chains, cfg.seed), cfg.seed, films)
        with _single_threaded_rendering():
            env = ChainEnv(env_cfg, max_steps_per_subtask=loop_cfg.max_ticks, video=films > 0)
        robot = chain_robot(env, make_clock(loop_cfg.mode, loop_cfg.spin_s))
        sampler, warmup_ms = _warm_up(policy, robot, specs[0])
        setup_s = time.perf_counter() - start
        print(
            f"policy: {sampler}; chunk of {policy.spec.horizon} actions; warm-up call {warmup_ms[-1]:.1f} ms; "
            f"strategy {loop_cfg.scheduler.strategy}; set-up {setup_s:.1f} s",
            flush=True,
        )
        runs, skipped, interrupted = _run_chains(cfg, loop_cfg, specs, robot, policy, start)
    finally:
        if env is not None:
            env.close()
        _restore_threads(saved_threads)
    wall = time.perf_counter() - start

    if not runs:
        summary: dict[str, Any] = {"num_chains": 0, "chains": []}
    else:
        summary = protocol.summarize([protocol.ChainResult(r.spec.tasks, r.num_success) for r in runs])
    summary.update(
        policy=policy_label(cfg.policy),
        policy_dir=policy_cfg.path,
        sampler=sampler,
        chains_requested=cfg.chains,
        chains_skipped=skipped,
        interrupted=interrupted,
        env_steps=sum(r.env_steps for r in runs),
        setup_s=setup_s,
        wall_time_s=wall,
        loop=_loop_settings(loop_cfg, runs),
        latency=latency_stats(runs, warmup_ms),
    )
    summary["artifacts"] = write_artifacts(cfg, loop_cfg, summary, runs, out_dir)
    summary["wall_time_s"] = time.perf_counter() - start  # with the video and the plot
    (out_dir / "results.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(format_summary(summary))
    return JobResult(summary=summary, exit_code=EXIT_INTERRUPTED if interrupted else 0)


@contextlib.contextmanager
def _single_threaded_rendering():
    """Mesa's software renderer (llvmpipe, what EGL gives on a machine without a GPU) draws with
    helper threads by default. The video's frames are drawn on the loop's thread, which then
    waits for those helpers, and on a busy machine they are scheduled late: ticks of 100 ms and
    more. With LP_NUM_THREADS=0 it draws on the calling thread (a 96x96 frame takes ~1 ms) at
    the loop's priority. Read when the GL context is created; a user's own setting is kept."""
    if "LP_NUM_THREADS" in os.environ:
        yield
        return
    os.environ["LP_NUM_THREADS"] = "0"
    try:
        yield
    finally:
        os.environ.pop("LP_NUM_THREADS", None)


def _set_threads(policy_cfg: PolicyConfig, threads: int | None) -> int | None:
    """Set torch's threads for a checkpoint policy; returns the previous count to restore (None: untouched)."""
    if policy_cfg.path is None or policy_cfg.threads is not None or threads is None:
        return None
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    return previous


def _restore_threads(previous: int | None) -> None:
    if previous is not None:
        import torch

        torch.set_num_threads(previous)


def _warm_up(policy, robot, spec) -> tuple[str, list[float]]:
    """A few untimed calls on the first chain's start (each path the loop may take); returns
    the sampler's description and the calls' latencies (ms)."""
    obs = robot.reset(options={"episode": spec})
    times = []
    info: dict = {}
    for i in range(WARMUP_CALLS):
        policy.reset(i)
        t = time.perf_counter()
        chunk = policy.act(obs)
        times.append((time.perf_counter() - t) * 1e3)
        info = chunk.info
        if callable(getattr(policy, "act_guided", None)):
            n = len(chunk.actions)
            policy.act_guided(obs, np.zeros_like(chunk.actions), np.zeros(n, np.float32))
    policy.reset(None)
    name = info.get("sampler")
    steps = info.get("sampler_steps")
    if name is None:
        return type(policy).__name__, times
    return f"{name}, {steps} step{'s' if steps != 1 else ''}" if steps else str(name), times


def _run_chains(cfg: DemoConfig, loop_cfg: LoopConfig, specs, robot, policy, start: float):
    """Run the chains in order; returns (runs, chains skipped by the time budget, interrupted)."""
    from tqdm import tqdm

    from dreamrt.runtime.chains import run_chain
    from dreamrt.sim.protocol import CHAIN_LENGTH

    worst_chain_s = CHAIN_LENGTH * loop_cfg.max_ticks / loop_cfg.rate_hz
    real = loop_cfg.mode == "real"
    runs = []
    bar = tqdm(total=len(specs), unit="chain", desc="demo", disable=not cfg.progress, dynamic_ncols=True)
    state = {"next": 0.0, "misses": 0, "held": 0}

    def on_tick(record: TickRecord, info: dict) -> None:
        state["misses"] += record.deadline_miss
        state["held"] += record.safety != 0
        now = time.perf_counter()
        if now < state["next"]:
            return
        state["next"] = now + STATUS_EVERY_S
        done = sum(r.num_success for r in runs)
        avg = f"{done / len(runs):.2f}" if runs else "-"
        bar.set_postfix_str(
            f"task {min(info['num_success'] + 1, CHAIN_LENGTH)}/{CHAIN_LENGTH} | infer {record.inference_ms:.0f} ms"
            f" | missed {state['misses']} | held {state['held']} | avg len {avg}",
            refresh=True,
        )

    interrupted = False
    skipped = 0
    try:
        for i, spec in enumerate(specs):
            if real and time.perf_counter() - start + worst_chain_s > cfg.time_budget_s:
                skipped = len(specs) - i
                bar.write(
                    f"time budget: {skipped} chain(s) not started (a chain may take {worst_chain_s:.0f} s and "
                    f"{time.perf_counter() - start:.0f} of {cfg.time_budget_s:.0f} s are used)"
                )
                break
            run = run_chain(spec, robot, policy, loop_cfg, on_tick=on_tick)
            if run.interrupted:
                interrupted = True
                break
            runs.append(run)
            bar.update(1)
            bar.set_postfix_str(
                f"avg len {sum(r.num_success for r in runs) / len(runs):.2f} | missed {state['misses']}"
                f" | held {state['held']}",
                refresh=True,
            )
    except KeyboardInterrupt:
        interrupted = True
    finally:
        bar.close()
    return runs, skipped, interrupted


# ---------------------------------------------------------------------------- figures


def latency_stats(runs, warmup_ms: list[float]) -> dict[str, Any]:
    """The latency table over every tick of every chain (chains' loops concatenated)."""
    records = [r for run in runs for r in run.records]
    reports = [rep for run in runs for rep in run.reports]
    inference = [r.inference_ms for r in records if r.chunk_arrived]
    events: dict[str, int] = {}
    for rep in reports:
        for reason, n in rep.safety_events.items():
            events[reason] = events.get(reason, 0) + n
    return {
        "ticks": len(records),
        "steps": sum(rep.steps for rep in reports),
        "inferences": len(inference),
        "inference_ms": Percentiles.of(inference).to_dict(),
        "jitter_ms": Percentiles.of(r.jitter_ms for r in records).to_dict(),
        "tick_ms": Percentiles.of(r.tick_ms for r in records).to_dict(),
        "obs_age_ms": Percentiles.of(r.obs_age_ms for r in records if r.obs_age_ms >= 0).to_dict(),
        "deadline_misses": sum(rep.deadline_misses for rep in reports),
        "held": sum(rep.held for rep in reports),
        "starved_ticks": sum(rep.starved_ticks for rep in reports),
        "safety_events": events,
        "inference_errors": sum(rep.inference_errors for rep in reports),
        "warmup_ms": warmup_ms,
    }


def _loop_settings(loop: LoopConfig, runs) -> dict[str, Any]:
    first = next((rep for run in runs for rep in run.reports), None)
    return {
        "mode": loop.mode,
        "rate_hz": loop.rate_hz,
        "strategy": loop.scheduler.strategy,
        "max_ticks_per_subtask": loop.max_ticks,
        "execute_steps": first.execute_steps if first else None,
        "horizon": first.horizon if first else None,
        "realtime": any(rep.realtime for run in runs for rep in run.reports),
    }


def write_artifacts(cfg: DemoConfig, loop: LoopConfig, summary: dict, runs, out_dir: Path) -> dict[str, Any]:
    """The video of the filmed chains and latency.png; returns their paths."""
    artifacts: dict[str, Any] = {
        "results": str(out_dir / "results.json"),
        "video": None,
        "latency_plot": None,
    }
    filmed = [r for r in runs if r.video]
    if filmed:
        artifacts["video"] = str(write_video(cfg, loop, filmed, out_dir / "video"))
    if summary["latency"]["ticks"]:
        artifacts["latency_plot"] = str(latency_plot(out_dir / "latency.png", runs, loop, summary))
    return artifacts


def write_video(cfg: DemoConfig, loop: LoopConfig, runs, path: Path) -> Path:
    """One video of the filmed chains, captioned with the instruction, progress and inference latency."""
    from dreamrt.sim.evaluate import VIDEO_HOLD_FRAMES
    from dreamrt.sim.protocol import CHAIN_LENGTH
    from dreamrt.sim.video import caption_frame
    from dreamrt.sim.video import write_video as write

    n = CHAIN_LENGTH
    frames = []
    for run in runs:
        i = run.spec.index
        for t, f in enumerate(run.video):
            last = t == len(run.video) - 1
            if t % cfg.video_stride and not last:
                continue
            header = f"chain {i}  task {min(f.subtask + 1, n)}/{n}"
            if last:  # how the chain ended, held on screen
                status = (
                    f"all {n} done" if f.subtask == n else f"{f.subtask} done, task {f.subtask + 1} failed"
                )
                frames += [
                    caption_frame(f.image, header, f.instruction, cfg.video_width, status)
                ] * VIDEO_HOLD_FRAMES
            else:  # the newest inference latency, so the run's timing shows beside what it does
                if f.inference_ms > 0:
                    header += f"  infer {f.inference_ms:.{0 if f.inference_ms >= 10 else 1}f} ms"
                status = f"{f.subtask} done" if f.subtask else ""
                frames.append(caption_frame(f.image, header, f.instruction, cfg.video_width, status))
    return write(path, frames, loop.rate_hz / cfg.video_stride, cfg.video_format)


def latency_plot(path: Path, runs, loop: LoopConfig, summary: dict) -> Path:
    """Per-chunk inference latency over the run (chain boundaries marked) and its histogram, with the tick budget."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    budget_ms = 1e3 / loop.rate_hz
    xs, ys, starts = [], [], []
    offset = 0
    for run in runs:
        starts.append(offset)
        for r in run.records:
            if r.chunk_arrived:
                xs.append(offset + r.step)
                ys.append(r.inference_ms)
        offset += sum(rep.steps for rep in run.reports)
    lat = summary["latency"]
    fig = Figure(figsize=(10, 4.2))
    FigureCanvasAgg(fig)
    ax, hx = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    ax.plot(np.asarray(xs) / loop.rate_hz, ys, ".", ms=3, color="#4c72b0", label="inference (per chunk)")
    ax.axhline(budget_ms, color="#c44e52", ls="--", lw=1, label=f"tick budget {budget_ms:.1f} ms")
    for s in starts[1:]:
        ax.axvline(s / loop.rate_hz, color="0.8", lw=0.8)
    ax.set_xlabel("control time (s, chains back to back; grey: new chain)")
    ax.set_ylabel("ms")
    ax.set_ylim(0, max(budget_ms * 1.3, max(ys, default=0) * 1.1))
    ax.legend(fontsize=8, loc="upper right")
    ax.set_title("inference latency over the run", fontsize=10)
    if ys:
        top = max(max(ys), budget_ms) * 1.05
        hx.hist(ys, bins=40, range=(0, top), color="#4c72b0")
    hx.axvline(budget_ms, color="#c44e52", ls="--", lw=1)
    p = lat["inference_ms"]
    if p["count"]:
        for q, style in (("p50", "-"), ("p99", ":")):
            hx.axvline(p[q], color="k", ls=style, lw=1, label=f"{q} {p[q]:.1f} ms")
        hx.legend(fontsize=8)
    hx.set_xlabel("inference latency per chunk (ms)")
    hx.set_ylabel("chunks")
    hx.set_title(
        f"{lat['inferences']} chunks, {lat['ticks']} ticks, {lat['deadline_misses']} missed deadlines",
        fontsize=10,
    )
    fig.suptitle(
        f"{summary['policy']} ({summary['sampler']}), {loop.scheduler.strategy}, {loop.mode} time at "
        f"{loop.rate_hz:g} Hz",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return path


def format_summary(summary: dict) -> str:
    """Success, the latency table and where the outputs went."""
    lines = []
    if summary.get("num_chains"):
        skipped = summary.get("chains_skipped") or 0
        note = " (interrupted: finished chains only)" if summary.get("interrupted") else ""
        if skipped:
            note += f" ({skipped} skipped by the time budget)"
        lines += [
            f"{summary['num_chains']} chains{note}",
            "SR1..SR5: "
            + "  ".join(f"{s:.3f}" for s in summary["sr"])
            + f"   avg len: {summary['avg_len']:.3f}",
        ]
    else:
        lines.append("no chain finished")
    lat, loop = summary["latency"], summary["loop"]
    lines.append(
        f"latency over {lat['ticks']} ticks and {lat['inferences']} chunks ({loop['mode']} time, "
        f"{loop['rate_hz']:g} Hz, {loop['strategy']}, horizon {loop['horizon']}, s={loop['execute_steps']}):"
    )
    lines.append(f"  {'':22s}{'p50':>9s}{'p99':>9s}{'max':>9s}")
    for key, label in (
        ("inference_ms", "inference (ms)"),
        ("jitter_ms", "tick jitter (ms)"),
        ("tick_ms", "tick work (ms)"),
        ("obs_age_ms", "observation age (ms)"),
    ):
        p = lat[key]
        cells = "".join(f"{p[q]:9.2f}" if p[q] is not None else f"{'-':>9s}" for q in ("p50", "p99", "max"))
        lines.append(f"  {label:22s}{cells}")
    # Held ticks: waiting for each subtask's first chunk, starved (queue ran dry), or a safety hold.
    events = {k: v for k, v in sorted(lat["safety_events"].items()) if v}
    waiting = lat["held"] - sum(events.values()) - lat["starved_ticks"]
    why = [f"{waiting} awaiting a subtask's first chunk"] if waiting else []
    why += [f"{lat['starved_ticks']} starved"] if lat["starved_ticks"] else []
    why += [f"{k} {v}" for k, v in events.items()]
    lines.append(
        f"  deadline misses {lat['deadline_misses']} of {lat['steps']} steps; held ticks {lat['held']}"
        f"{' (' + ', '.join(why) + ')' if why else ''}; tick budget {1e3 / loop['rate_hz']:.1f} ms"
    )
    lines.append(
        f"{summary['env_steps']} env steps; set-up {summary['setup_s']:.1f} s; wall time {summary['wall_time_s']:.1f} s"
    )
    art = summary.get("artifacts") or {}
    for key, label in (("video", "video"), ("latency_plot", "latency plot"), ("results", "results")):
        if art.get(key):
            lines.append(f"{label}: {art[key]}")
    return "\n".join(lines)
