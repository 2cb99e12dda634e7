"""`dreamrt eval`: the chain-running env (no reset between subtasks, stop at the first failure),
the parallel driver (results independent of the worker count), the job's outputs and its CLI."""

from __future__ import annotations

import functools
import json
import multiprocessing
import os
from dataclasses import replace

os.environ.setdefault("MUJOCO_GL", "egl")  # before mujoco is first imported

import imageio.v3 as iio  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from dreamrt.cli.main import main  # noqa: E402
from dreamrt.errors import UserError  # noqa: E402
from dreamrt.policies.factory import PolicyConfig  # noqa: E402
from dreamrt.policies.random_policy import RandomPolicy  # noqa: E402
from dreamrt.sim import protocol, scene  # noqa: E402
from dreamrt.sim.env import EnvConfig  # noqa: E402
from dreamrt.sim.evaluate import (  # noqa: E402
    VIDEO_HOLD_FRAMES,
    EvalConfig,
    chain_specs,
    format_summary,
    run,
    summarize_failures,
)
from dreamrt.sim.language import eval_instruction  # noqa: E402
from dreamrt.sim.rollout import (  # noqa: E402
    ChainEnv,
    EpisodeSpec,
    run_episodes,
    run_episodes_in_processes,
)
from dreamrt.sim.state import SymbolicState  # noqa: E402
from dreamrt.sim.video import mp4_available  # noqa: E402

HOLD_OPEN = np.array([0, 0, 0, 0, 0, 0, 1.0])  # stand still, gripper open


def _spec(tasks, **state) -> EpisodeSpec:
    base = dict(
        led=0,
        lightbulb=0,
        slider="right",
        drawer="closed",
        blocks={"red": "table", "blue": "table", "pink": "slider_left"},
    )
    base.update(state)
    return EpisodeSpec(
        index=0,
        start_state=SymbolicState(**base),
        tasks=tuple(tasks),
        instructions=tuple(eval_instruction(t) for t in tasks),
        env_seed=3,
        policy_seeds=(1,) * len(tasks),
    )


def _set_joint(env: ChainEnv, name: str, value: float) -> None:
    inner = env.env
    inner.data.qpos[inner.model.joint(name).qposadr[0]] = value
    inner.data.qvel[inner.model.joint(name).dofadr[0]] = 0.0


def test_chain_env_switches_subtasks_without_reset_and_stops_at_first_failure():
    env = ChainEnv(EnvConfig(cameras=False), max_steps_per_subtask=5)
    spec = _spec(["open_drawer", "turn_on_lightbulb", "move_slider_left"])
    obs, info = env.reset(options={"episode": spec})
    assert obs["task"] == eval_instruction("open_drawer")
    assert info["env_resets"] == 1 and info["new_subtask"] and info["subtask"] == 0

    # Subtask 1 succeeds the first step its check fires: open the drawer by hand.
    _set_joint(env, "drawer", scene.DRAWER_RANGE)
    obs, _, terminated, _, info = env.step(HOLD_OPEN)
    assert info["success"] and info["new_subtask"] and info["num_success"] == 1 and not terminated
    assert info["subtask"] == 0 and info["subtask_steps"] == 1
    assert obs["task"] == eval_instruction("turn_on_lightbulb")  # the next instruction at once
    assert env.env.instruction == eval_instruction("turn_on_lightbulb")

    # No reset between subtasks: the open drawer carries over and the reset count stays 1.
    obs, _, terminated, _, info = env.step(HOLD_OPEN)
    assert obs["observation.environment_state"][1] > 0.2
    assert info["env_resets"] == 1 and env.num_env_resets == 1 and not info["success"]
    assert info["subtask"] == 1 and info["subtask_steps"] == 1

    # Subtask 2 is checked against the snapshot taken when it began (drawer already open).
    _set_joint(env, "switch", scene.SWITCH_RANGE)
    obs, _, terminated, _, info = env.step(HOLD_OPEN)
    assert (
        info["success"] and info["num_success"] == 2 and obs["task"] == eval_instruction("move_slider_left")
    )

    # Subtask 3 never succeeds: the chain ends after max_steps_per_subtask steps.
    for k in range(1, 6):
        obs, _, terminated, _, info = env.step(HOLD_OPEN)
        assert terminated == (k == 5), k
    assert info["num_success"] == 2 and info["subtask_steps"] == 5 and info["done"]
    steps = env.total_steps
    last = obs
    # Finished: further steps are no-ops (the vector env steps every sub-env) until the next reset.
    obs, _, terminated, _, info = env.step(HOLD_OPEN)
    assert terminated and env.total_steps == steps and obs is last
    env.reset(options={"episode": spec})
    assert env.num_env_resets == 2
    env.close()


def test_chain_env_names_the_other_tasks_a_failed_subtask_did():
    env = ChainEnv(EnvConfig(cameras=False), max_steps_per_subtask=3, watch_other_tasks=True)
    env.reset(options={"episode": _spec(["open_drawer"])})
    _set_joint(env, "slider", scene.SLIDER_RANGE)  # the slider all the way left, not the drawer
    _, _, _, _, info = env.step(HOLD_OPEN)
    assert info["other_tasks"] == "move_slider_left" and not info["success"]
    _set_joint(env, "switch", scene.SWITCH_RANGE)
    for _ in range(2):
        _, _, terminated, _, info = env.step(HOLD_OPEN)
    assert terminated and info["other_tasks"] == "move_slider_left,turn_on_lightbulb"  # in firing order
    env.reset(options={"episode": _spec(["open_drawer"])})  # a new subtask starts with none
    _, _, _, _, info = env.step(HOLD_OPEN)
    assert info["other_tasks"] == ""
    env.close()

    unwatched = ChainEnv(EnvConfig(cameras=False), max_steps_per_subtask=3)
    unwatched.reset(options={"episode": _spec(["open_drawer"])})
    _set_joint(unwatched, "slider", scene.SLIDER_RANGE)
    _, _, _, _, info = unwatched.step(HOLD_OPEN)
    assert info["other_tasks"] == ""
    unwatched.close()


def test_a_policy_told_the_wrong_task_fails_with_the_task_it_did():
    from dreamrt.sim.expert import ScriptedExpert

    # The check wants the drawer open; the expert is told to move the slider left.
    spec = replace(_spec(["open_drawer"]), instructions=(eval_instruction("move_slider_left"),))
    cfg = EnvConfig(cameras=False)
    for watch, expected in ((True, ("move_slider_left",)), (False, ())):
        [outcome] = run_episodes(
            [spec],
            [ScriptedExpert(), ScriptedExpert()],
            cfg,
            num_workers=2,
            max_steps_per_subtask=150,
            watch_other_tasks=watch,
        )
        assert outcome.num_success == 0 and outcome.other_tasks_of_failure == expected


def test_summarize_failures_counts_confusions():
    results = [
        (("open_drawer", "turn_on_led"), 2, ("move_slider_left",)),  # all done: not a failure
        (("open_drawer", "turn_on_led"), 1, ("turn_off_lightbulb", "move_slider_left")),
        (("open_drawer",), 0, ()),
        (("open_drawer",), 0, ("move_slider_left",)),
        (("stack_block",), 0, ("move_slider_left",)),
    ]
    f = summarize_failures(results)
    assert f["failed"] == 4 and f["did_another_task"] == 3
    assert f["by_task"]["open_drawer"] == {
        "failed": 2,
        "did_another_task": 1,
        "instead": {"move_slider_left": 1},
    }
    assert f["by_task"]["turn_on_led"]["instead"] == {"turn_off_lightbulb": 1, "move_slider_left": 1}
    assert list(f["by_task"])[0] == "open_drawer"  # the most failures first
    assert f["confusions"][0] == ["open_drawer", "move_slider_left", 1]
    assert len(f["confusions"]) == 4
    text = format_summary(
        {
            "mode": "tasks",
            "num_episodes": 5,
            "per_task": {"open_drawer": 0.5},
            "mean_success": 0.5,
            "min_task": {"task": "open_drawer", "success": 0.5},
            "env_steps": 10,
            "wall_time_s": 1.0,
            "steps_per_s": 10.0,
            "failures": f,
        }
    )
    assert "failed subtasks: 4, of which 3 did another task instead" in text


def test_chain_env_needs_an_episode():
    env = ChainEnv(EnvConfig(cameras=False))
    with pytest.raises(UserError, match="EpisodeSpec"):
        env.reset(options={})
    env.close()


def test_results_do_not_depend_on_the_number_of_workers():
    specs = chain_specs(protocol.generate_chains(3, seed=5), seed=5, films=0)
    cfg = EnvConfig(cameras=False)
    finals = {}
    for workers in (0, 2, "independent"):
        if workers == "independent":  # each worker process builds its own policy
            build = functools.partial(RandomPolicy, seed=1)
            outcomes = run_episodes_in_processes(specs, build, cfg, num_workers=2, max_steps_per_subtask=25)
        else:
            policies = [RandomPolicy(seed=1) for _ in range(max(1, workers))]
            outcomes = run_episodes(specs, policies, cfg, num_workers=workers, max_steps_per_subtask=25)
        assert sorted(o.spec.index for o in outcomes) == [0, 1, 2]
        finals[workers] = {
            o.spec.index: (o.num_success, o.steps, o.final_env_state.tobytes(), o.final_robot_state.tobytes())
            for o in outcomes
        }
        if workers == 0:  # one env ran all three chains: one scene reset per chain
            assert sorted(o.env_resets for o in outcomes) == [1, 2, 3]
    assert finals[0] == finals[2] == finals["independent"]
    # The arm moved: the comparison above is not between two idle scenes.
    assert len({v[3] for v in finals[0].values()}) == 3


def test_independent_workers_stop_when_asked_and_report_a_failing_worker():
    specs = chain_specs(protocol.generate_chains(8, seed=5), seed=5, films=0)
    cfg = EnvConfig(cameras=False)
    seen = []
    outcomes = run_episodes_in_processes(
        specs,
        functools.partial(RandomPolicy, seed=1),
        cfg,
        num_workers=2,
        max_steps_per_subtask=25,
        on_outcome=lambda o: seen.append(o) or len(seen) == 2,
    )
    assert len(outcomes) == len(seen) == 2  # the episodes in flight were abandoned
    assert not multiprocessing.active_children()
    # A policy the env cannot take fails inside the worker; the error names the cause.
    with pytest.raises(RuntimeError, match="3-d actions"):
        run_episodes_in_processes(
            specs, functools.partial(RandomPolicy, action_dim=3), cfg, num_workers=2, max_steps_per_subtask=25
        )
    assert not multiprocessing.active_children()


def test_eval_job_with_the_random_policy(tmp_path):
    cfg = EvalConfig(
        policy=PolicyConfig(name="random"),
        num_chains=2,
        max_steps_per_subtask=30,
        num_workers=2,
        videos=1,
        progress=False,
    )
    result = run(cfg, tmp_path)
    s = result.summary
    assert result.exit_code == 0 and not s["interrupted"]
    assert {"avg_len", "sr", "per_task", "num_chains", "chains", "wall_time_s", "steps_per_s"} <= set(s)
    assert s["num_chains"] == 2 and len(s["sr"]) == 5 and len(s["chains"]) == 2
    chains = protocol.generate_chains(2, seed=0)
    assert [c["tasks"] for c in s["chains"]] == [list(c.tasks) for c in chains]
    assert s["avg_len"] == pytest.approx(sum(s["sr"]))
    # Every chain ends with a failed subtask of 30 steps unless all five succeeded.
    failing = [c for c in s["chains"] if c["num_success"] < 5]
    assert s["env_steps"] >= 30 * len(failing) and s["env_steps"] <= 2 * 5 * 30
    assert s["steps_per_s"] > 0
    assert s["failures"]["failed"] == len(failing)
    assert sum(e["failed"] for e in s["failures"]["by_task"].values()) == len(failing)

    written = json.loads((tmp_path / "results.json").read_text())
    assert {k: written[k] for k in ("avg_len", "sr", "per_task", "chains")} == {
        k: s[k] for k in ("avg_len", "sr", "per_task", "chains")
    }
    png = iio.imread(tmp_path / "per_task.png")
    assert png.ndim == 3 and png.shape[0] > 100
    video = tmp_path / "videos" / "chain_000.gif"
    assert s["artifacts"]["videos"] == [str(video)]
    frames = iio.imread(video, index=None)  # (T, H, W, 3)
    assert frames.shape[2] == cfg.video_width and frames.shape[1] > cfg.video_width  # caption band above
    if s["chains"][0]["num_success"] == 0:
        # 31 frames (reset + 30 steps), every 2nd kept: 16; GIF merges the held copies of the last one.
        from PIL import Image

        assert len(frames) == 16
        with Image.open(video) as gif:
            gif.seek(15)
            step_ms = round(1000 / 15)  # 30 Hz / video_stride 2
            assert abs(gif.info["duration"] - VIDEO_HOLD_FRAMES * step_ms) <= VIDEO_HOLD_FRAMES
    assert not (tmp_path / "videos" / "chain_001.gif").exists()


def test_eval_with_the_expert_succeeds_and_is_reproducible(tmp_path):
    import dreamrt.sim.expert  # noqa: F401  (the expert must exist for this test)

    summaries = []
    for workers in (0, 2):
        cfg = EvalConfig(num_chains=2, num_workers=workers, videos=0, progress=False, seed=1)
        summaries.append(run(cfg, tmp_path / str(workers)).summary)
    a, b = summaries
    assert a["chains"] == b["chains"] and a["env_steps"] == b["env_steps"]
    assert a["avg_len"] >= 1.0  # the expert solves most tasks; a random policy scores ~0


def test_eval_config_checks():
    with pytest.raises(UserError, match="num_chains"):
        EvalConfig(num_chains=0)
    with pytest.raises(UserError, match="gif"):
        EvalConfig(video_format="avi")
    if not mp4_available():
        with pytest.raises(UserError, match="imageio-ffmpeg"):
            EvalConfig(video_format="mp4")


def test_eval_cli_help_and_user_errors(capsys):
    assert main(["eval", "--help"]) == 0
    out = capsys.readouterr().out
    assert "num_chains: 1000" in out and "max_steps_per_subtask: 360" in out and "name: expert" in out
    assert main(["eval", "policy=randm"]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "randm" in err and "random" in err and "expert" in err
    assert main(["eval", "num_chains=abc"]) == 2
    assert "num_chains" in capsys.readouterr().err
    for command in (["record", "--help"], ["bench", "sim", "--help"]):
        assert main(command) == 0


def test_task_mode_runs_every_task_from_states_that_allow_it_and_the_expert_solves_them(tmp_path):
    from dreamrt.sim.evaluate import task_specs
    from dreamrt.sim.tasks import task_names

    specs = task_specs(episodes_per_task=2, seed=0, films=0)
    assert [s.tasks[0] for s in specs] == [t for t in task_names() for _ in range(2)]
    assert all(protocol.precondition_holds(s.tasks[0], s.start_state) for s in specs)
    assert task_specs(2, 0, 0) == specs  # a function of the seed alone

    cfg = EvalConfig(mode="tasks", episodes_per_task=1, num_workers=0, videos=0, progress=False)
    summary = run(cfg, tmp_path).summary
    assert summary["mode"] == "tasks" and summary["num_episodes"] == len(task_names())
    assert set(summary["per_task"]) == set(task_names())
    assert summary["mean_success"] >= 0.9, summary["per_task"]
    assert (tmp_path / "per_task.png").is_file()


def test_task_mode_filtered_to_some_tasks_repeats_their_episodes_of_the_full_set(tmp_path):
    picked = ["turn_on_led", "open_drawer"]
    cfg = EvalConfig(mode="tasks", episodes_per_task=2, tasks=picked, num_workers=0, videos=1, progress=False)
    summary = run(cfg, tmp_path).summary
    assert summary["num_episodes"] == 4 and set(summary["per_task"]) == set(picked)
    assert summary["mean_success"] == 1.0, summary["per_task"]  # the expert
    from dreamrt.sim.evaluate import task_specs

    first = next(s for s in task_specs(2, 0, 0) if s.tasks[0] in picked)
    # One film, of the first picked episode, named by its index in the full set (whose seeds it keeps).
    assert [os.path.basename(v) for v in summary["artifacts"]["videos"]] == [f"chain_{first.index:03d}.gif"]
    with pytest.raises(UserError, match="Did you mean 'turn_on_led'"):
        EvalConfig(mode="tasks", tasks=["turn_on_leds"])
    with pytest.raises(UserError, match="mode=tasks"):
        EvalConfig(mode="chains", tasks=["turn_on_led"])


def test_instructions_train_tells_training_paraphrases_on_the_same_episodes(tmp_path):
    from dreamrt.sim.evaluate import task_specs
    from dreamrt.sim.language import train_instructions

    chains = protocol.generate_chains(6, 0)
    told, held_out = chain_specs(chains, 0, 0, "train"), chain_specs(chains, 0, 0)

    def without_words(specs):
        return [(s.index, s.start_state, s.tasks, s.env_seed, s.policy_seeds) for s in specs]

    assert without_words(told) == without_words(held_out)
    said = [(t, i) for s in told for t, i in zip(s.tasks, s.instructions)]
    assert all(i in train_instructions(t) and i != eval_instruction(t) for t, i in said)
    assert len({i for _, i in said}) > len({t for t, _ in said})  # drawn per subtask, not one per task
    assert chain_specs(chains, 0, 0, "train") == told  # from the seed alone
    singles = task_specs(1, 0, 0, instructions="train")
    assert without_words(singles) == without_words(task_specs(1, 0, 0))
    assert all(s.instructions[0] in train_instructions(s.tasks[0]) for s in singles)

    cfg = EvalConfig(mode="tasks", tasks=["turn_on_led"], episodes_per_task=1, instructions="train")
    summary = run(replace(cfg, num_workers=0, videos=0, progress=False), tmp_path).summary
    assert summary["instructions"] == "train" and summary["mean_success"] == 1.0  # the expert
    assert "not CALVIN's protocol" in format_summary(summary)
    with pytest.raises(UserError, match="instructions"):
        EvalConfig(instructions="test")


# ---------------------------------------------------------------------------- interrupt and resume


def _random_eval(**kwargs) -> EvalConfig:
    base = dict(
        policy=PolicyConfig(name="random"), num_chains=10, max_steps_per_subtask=150, videos=0, progress=False
    )
    return EvalConfig(**{**base, **kwargs})


def _episode_lines(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "episodes.jsonl").read_text().splitlines()[1:]]


def test_sigterm_stops_an_evaluation_and_resume_finishes_it_as_one_run_would(tmp_path):
    import signal
    import subprocess
    import sys
    import time

    straight = run(_random_eval(num_workers=0), tmp_path / "straight").summary

    stopped = tmp_path / "stopped"
    args = ["eval", "policy=random", "num_chains=10", "max_steps_per_subtask=150", "videos=0", "progress=false",
            "num_workers=2", "--out", str(stopped)]  # fmt: skip
    script = f"import sys; from dreamrt.cli.main import main; sys.exit(main({args!r}))"
    process = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    log = stopped / "episodes.jsonl"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and process.poll() is None:
        if log.is_file() and len(log.read_text().splitlines()) >= 3:  # the header and two episodes
            break
        time.sleep(0.02)
    process.send_signal(signal.SIGTERM)
    out, err = process.communicate(timeout=120)
    assert process.returncode == 130, err.decode()[-2000:]
    partial = json.loads((stopped / "results.json").read_text())
    assert partial["interrupted"] and 2 <= partial["num_chains"] < 10
    assert not multiprocessing.active_children()
    # The chains that finished carry their index, so a stopped run pairs up with a whole one.
    by_index = {c["index"]: c for c in straight["chains"]}
    assert all(c == by_index[c["index"]] for c in partial["chains"])

    with pytest.raises(UserError, match="already holds an evaluation"):
        run(_random_eval(num_workers=0), stopped)
    with pytest.raises(UserError, match=r"seed: 0 then, 1 now"):
        run(_random_eval(num_workers=0, seed=1, resume=True), stopped)
    resumed = run(_random_eval(num_workers=0, resume=True), stopped).summary  # workers may change
    assert resumed["resumed_episodes"] == partial["num_chains"]
    for key in ("chains", "avg_len", "sr", "per_task", "failures", "env_steps"):
        assert resumed[key] == straight[key], key
    assert sorted(e["index"] for e in _episode_lines(stopped)) == list(range(10))  # none ran twice


def test_resume_reads_what_a_killed_run_left_and_refuses_what_it_cannot_use(tmp_path):
    whole = run(_random_eval(num_chains=4, num_workers=0), tmp_path / "whole").summary
    # A run killed mid-write: the header, two episodes, and half of a third line.
    lines = (tmp_path / "whole" / "episodes.jsonl").read_text().splitlines(keepends=True)
    killed = tmp_path / "killed"
    killed.mkdir()
    (killed / "episodes.jsonl").write_text("".join(lines[:3]) + lines[3][: len(lines[3]) // 2])
    resumed = run(_random_eval(num_chains=4, num_workers=0, resume=True), killed).summary
    assert resumed["resumed_episodes"] == 2 and resumed["chains"] == whole["chains"]
    assert [e["index"] for e in _episode_lines(killed)] == [0, 1, 2, 3]

    with pytest.raises(UserError, match="has none"):
        run(_random_eval(num_chains=4, num_workers=0, resume=True), tmp_path / "empty")
    with pytest.raises(UserError, match="--out DIR"):
        run(_random_eval(num_chains=4, num_workers=0, resume=True), None)
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "episodes.jsonl").write_text("index,success\n0,1\n")
    with pytest.raises(UserError, match="not an episode log"):
        run(_random_eval(num_chains=4, num_workers=0, resume=True), tmp_path / "foreign")
