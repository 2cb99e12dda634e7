"""`dreamrt demo`: chains under the real-time loop with a tiny DP-T checkpoint and with the expert."""

import json

import imageio.v3 as iio
import pytest

from dreamrt.cli.commands import by_name
from dreamrt.cli.main import compose
from dreamrt.errors import UserError
from dreamrt.policies import shipped
from dreamrt.policies.factory import PolicyConfig
from dreamrt.runtime.chunking import SchedulerConfig
from dreamrt.runtime.demo import DemoConfig, format_summary, run
from dreamrt.runtime.loop import LoopConfig
from dreamrt.sim.evaluate import VIDEO_HOLD_FRAMES

DEMO = by_name()["demo"]
SUMMARY_KEYS = {
    "avg_len",
    "sr",
    "num_chains",
    "chains",
    "latency",
    "loop",
    "wall_time_s",
    "artifacts",
    "sampler",
}


def test_tiny_checkpoint_runs_a_chain_under_the_real_time_loop(tiny_state_checkpoint, tmp_path, capsys):
    ticks = 30  # per subtask: one second of wall clock
    cfg = DemoConfig(
        policy=PolicyConfig(path=str(tiny_state_checkpoint)),
        loop=LoopConfig(max_ticks=ticks, scheduler=SchedulerConfig(strategy="rtc")),
        chains=1,
        progress=False,
    )
    summary = run(cfg, tmp_path).summary
    assert SUMMARY_KEYS <= set(summary)
    assert summary["num_chains"] == 1 and summary["chains_skipped"] == 0 and not summary["interrupted"]
    assert summary["sampler"] == "ddim, 3 steps" and summary["loop"]["strategy"] == "rtc"
    assert summary["loop"]["mode"] == "real" and summary["loop"]["horizon"] == 4
    done = summary["chains"][0]["num_success"]
    assert 0 <= done <= 5 and summary["avg_len"] == done and summary["sr"][0] == (done >= 1)

    lat = summary["latency"]
    # One loop per attempted subtask; the failed one covers all `ticks` control steps.
    assert ticks <= lat["steps"] <= (done + 1) * ticks or done == 5
    assert 0 < lat["ticks"] <= lat["steps"] and summary["env_steps"] == lat["ticks"]
    assert 3 <= lat["inferences"] <= lat["ticks"]  # chunks of 4, asked for every 2 steps, one in flight
    inf = lat["inference_ms"]
    assert inf["count"] == lat["inferences"] and 0 < inf["p50"] <= inf["p99"] <= inf["max"] < 1000
    assert lat["jitter_ms"]["count"] == lat["ticks"] and lat["tick_ms"]["p50"] > 0
    assert 0 <= lat["obs_age_ms"]["p50"] < 100 and len(lat["warmup_ms"]) == 3

    art = summary["artifacts"]
    assert art["video"].endswith("video.mp4") and art["latency_plot"].endswith("latency.png")
    frames = iio.imread(art["video"])  # (T, H, W, 3): the reset, every 2nd step, the last one held
    n = lat["ticks"]
    assert frames.shape[0] == len(range(0, n + 1, 2)) + n % 2 - 1 + VIDEO_HOLD_FRAMES
    assert frames.shape[2] == 288 and iio.imread(art["latency_plot"]).shape[2] in (3, 4)
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["latency"] == json.loads(json.dumps(lat)) and saved["avg_len"] == summary["avg_len"]
    out = capsys.readouterr().out
    assert "SR1..SR5" in out and "inference (ms)" in out and "tick jitter (ms)" in out and "video:" in out


def test_the_expert_solves_a_chain_under_the_loop_and_runs_sync(tmp_path, capsys):
    cfg = DemoConfig(
        policy=PolicyConfig(name="expert"),
        loop=LoopConfig(mode="virtual", scheduler=SchedulerConfig(strategy="rtc")),
        chains=1,
        videos=0,
        progress=False,
    )
    summary = run(cfg, tmp_path).summary
    assert "running sync" in capsys.readouterr().out  # a one-action policy cannot run ahead of itself
    assert summary["loop"]["strategy"] == "sync" and summary["num_chains"] == 1
    assert summary["avg_len"] >= 1  # the expert gets through at least the first subtask
    lat = summary["latency"]
    assert lat["deadline_misses"] == 0 and lat["held"] == 0 and lat["inferences"] == lat["ticks"]
    assert summary["artifacts"]["video"] is None and (tmp_path / "latency.png").is_file()


def test_the_time_budget_stops_chains_from_starting(tiny_state_checkpoint, tmp_path, capsys):
    cfg = DemoConfig(
        policy=PolicyConfig(path=str(tiny_state_checkpoint)),
        loop=LoopConfig(max_ticks=30),  # a worst-case chain: 5 x 1 s
        chains=2,
        time_budget_s=2.0,
        progress=False,
    )
    summary = run(cfg, tmp_path).summary
    assert summary["num_chains"] == 0 and summary["chains_skipped"] == 2
    assert summary["artifacts"]["video"] is None and summary["artifacts"]["latency_plot"] is None
    assert "no chain finished" in format_summary(summary) and (tmp_path / "results.json").is_file()


def test_the_shipped_checkpoint_is_the_default_and_its_absence_is_explained(tmp_path, monkeypatch):
    assert DemoConfig().policy.path == "shipped:dpt_state_cm"
    monkeypatch.setattr(shipped, "candidate_dirs", lambda: [tmp_path / "a", tmp_path / "b"])
    with pytest.raises(UserError, match=r"policy\.path=DIR") as error:
        run(DemoConfig(progress=False), tmp_path / "out")
    assert "dpt_state_cm" in str(error.value) and str(tmp_path / "a") in str(error.value)
    (tmp_path / "b" / "dpt_state_cm").mkdir(parents=True)
    assert shipped.resolve_policy_path("shipped:dpt_state_cm") == str(tmp_path / "b" / "dpt_state_cm")
    assert shipped.resolve_policy_path("runs/x") == "runs/x" and shipped.resolve_policy_path(None) is None
    with pytest.raises(UserError, match="plain name"):
        shipped.shipped_checkpoint("../etc")


def test_the_repo_checkout_is_searched():
    dirs = shipped.candidate_dirs()
    import dreamrt

    repo = __import__("pathlib").Path(dreamrt.__file__).resolve().parent.parent
    assert repo / "checkpoints" in dirs


def test_config_composes_and_rejects_bad_values():
    cfg, _ = compose(DEMO, [])
    assert cfg.policy.path == "shipped:dpt_state_cm" and cfg.chains == 8 and cfg.loop.max_ticks == 360
    assert cfg.loop.scheduler.strategy == "rtc" and cfg.loop.mode == "real" and cfg.env.scene == "D"
    cfg, _ = compose(DEMO, ["policy=expert", "chains=3", "loop.mode=virtual"])
    assert (cfg.policy.name, cfg.policy.path, cfg.chains, cfg.loop.mode) == ("expert", None, 3, "virtual")
    cfg, _ = compose(DEMO, ["policy.path=/ckpt", "policy.sampler=consistency"])
    assert (cfg.policy.path, cfg.policy.sampler) == ("/ckpt", "consistency")
    for bad in (["chains=0"], ["video_format=avi"], ["time_budget_s=-1"], ["chians=3"]):
        with pytest.raises(UserError):
            compose(DEMO, bad)


def test_a_chain_under_the_loop_matches_the_rollout_driver_for_the_expert():
    """Under the sync loop the expert acts on every step's observation, as in run_episodes: same chain, same steps."""
    from dreamrt.runtime.chains import chain_robot, run_chain
    from dreamrt.runtime.clock import VirtualClock
    from dreamrt.sim import protocol
    from dreamrt.sim.env import EnvConfig
    from dreamrt.sim.evaluate import chain_specs
    from dreamrt.sim.expert import ScriptedExpert
    from dreamrt.sim.rollout import ChainEnv, run_episodes

    ticks = 45  # short subtasks: some chains end early, exercising the failure path too
    specs = chain_specs(protocol.generate_chains(3, 7), 7, films=3)
    env_cfg = EnvConfig()
    expected = run_episodes(
        specs, [ScriptedExpert()], env_cfg, num_workers=0, max_steps_per_subtask=ticks, video=True
    )
    expected = {o.spec.index: o for o in expected}
    env = ChainEnv(env_cfg, max_steps_per_subtask=ticks, video=True)
    loop = LoopConfig(max_ticks=ticks, mode="virtual", scheduler=SchedulerConfig(strategy="sync"))
    try:
        robot = chain_robot(env, VirtualClock())
        policy = ScriptedExpert()
        for spec in specs:
            run = run_chain(spec, robot, policy, loop)
            want = expected[spec.index]
            assert (run.num_success, run.env_steps) == (want.num_success, want.steps), spec.index
            assert len(run.reports) == min(run.num_success + 1, 5)
            assert all(s <= ticks for s in run.subtask_steps[: run.num_success])
            if run.num_success < 5:
                assert run.subtask_steps[-1] == ticks  # the failed subtask ran out of time
            # The instruction on screen follows the chain: subtask k shows instruction k.
            assert len(run.video) == run.env_steps + 1
            for frame in run.video:
                assert frame.instruction == spec.instructions[min(frame.subtask, len(spec.tasks) - 1)]
            assert [f.subtask for f in run.video] == [v[2] for v in want.video]
    finally:
        env.close()
    assert {o.num_success for o in expected.values()} != {5}  # at 45 steps not every subtask makes it


def test_a_chunking_policy_under_the_sync_loop_matches_the_rollout_driver(tiny_state_checkpoint):
    """A DP-T with an observation history (To 2) and chunks of 4, run by the sync loop in virtual time,
    takes exactly the steps `dreamrt eval`'s driver takes: same history, same chunks, same actions.

    The robot's final state is compared bit for bit, so one action out of place (a chunk started one
    step late, a history that skips a step) fails the test."""
    import numpy as np

    from dreamrt.policies.diffusion_policy import load_diffusion_policy
    from dreamrt.runtime.chains import chain_robot, run_chain
    from dreamrt.runtime.clock import VirtualClock
    from dreamrt.sim import protocol
    from dreamrt.sim.env import EnvConfig
    from dreamrt.sim.evaluate import chain_specs
    from dreamrt.sim.rollout import ChainEnv, run_episodes

    ticks = 21  # not a multiple of the chunk length: the last chunk is cut short
    specs = chain_specs(protocol.generate_chains(2, 3), 3, films=0)
    env_cfg = EnvConfig(cameras=False)
    policy = load_diffusion_policy(tiny_state_checkpoint)
    assert policy.spec.n_obs_steps == 2 and policy.spec.horizon == 4
    expected = run_episodes(specs, [policy], env_cfg, num_workers=0, max_steps_per_subtask=ticks)
    expected = {o.spec.index: o for o in expected}
    env = ChainEnv(env_cfg, max_steps_per_subtask=ticks)
    # Inference charged no simulated time: a sync loop charged the measured compute would skip the
    # ticks of any call slower than a period (on a loaded machine), and the robot stands still on those.
    loop = LoopConfig(
        max_ticks=ticks, mode="virtual", virtual_latency_s=0.0, scheduler=SchedulerConfig(strategy="sync")
    )
    try:
        robot = chain_robot(env, VirtualClock())
        for spec in specs:
            run = run_chain(spec, robot, load_diffusion_policy(tiny_state_checkpoint), loop)
            want = expected[spec.index]
            assert (run.num_success, run.env_steps) == (want.num_success, want.steps), spec.index
            obs = robot.observe()
            np.testing.assert_array_equal(obs["observation.state"], want.final_robot_state)
            np.testing.assert_array_equal(obs["observation.environment_state"], want.final_env_state)
            assert run.reports[0].inferences == -(-ticks // 4)  # a chunk every 4 steps, none skipped
    finally:
        env.close()


def test_the_demo_command_runs_this_job(capsys):
    from dreamrt.cli.main import main

    command = by_name()["demo"]
    assert (command.schema, command.job) == ("dreamrt.runtime.demo:DemoConfig", "dreamrt.runtime.demo:run")
    assert main(["demo", "--help"]) == 0
    out = capsys.readouterr().out
    assert "path: shipped:dpt_state_cm" in out and "chains: 8" in out and "strategy: rtc" in out
