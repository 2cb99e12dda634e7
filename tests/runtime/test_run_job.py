"""`dreamrt run`: a policy in the sim under the loop, recorded, with the report in the run directory."""

from __future__ import annotations

import json

import pytest

from dreamrt.episodes import open_store
from dreamrt.episodes.inspect import VerifyConfig, run_verify
from dreamrt.errors import UserError
from dreamrt.policies.factory import PolicyConfig
from dreamrt.runtime.chunking import SchedulerConfig
from dreamrt.runtime.loop import LoopConfig
from dreamrt.runtime.run_job import RunConfig, run
from dreamrt.sim.env import EnvConfig
from dreamrt.sim.language import eval_instruction


@pytest.mark.parametrize("action_mode", ["rel_cartesian", "abs_cartesian"])
def test_expert_opens_the_drawer_in_virtual_time(tmp_path, action_mode):
    cfg = RunConfig(
        policy=PolicyConfig(name="expert"),
        env=EnvConfig(cameras=False, action_mode=action_mode),  # the expert speaks the env's mode
        loop=LoopConfig(
            mode="virtual", max_ticks=360, virtual_latency_s=0.002, scheduler=SchedulerConfig(strategy="sync")
        ),
        task="open_drawer",
        status=False,
    )
    result = run(cfg, tmp_path)
    s = result.summary
    assert result.exit_code == 0
    assert s["success"] and s["success_step"] < 359
    assert s["steps"] == s["success_step"] + 1  # stopped on success
    assert s["deadline_misses"] == 0 and s["held"] == 0 and s["mode"] == "virtual"
    assert s["instruction"] == eval_instruction("open_drawer") and s["policy"] == "expert"
    assert json.loads((tmp_path / "loop_report.json").read_text()) == json.loads(json.dumps(s))
    store = open_store(tmp_path / "episode.zarr")
    assert store.num_frames == s["ticks"] == s["frames_recorded"] and s["frames_dropped"] == 0
    assert store.episode_tasks(0) == [eval_instruction("open_drawer")]
    assert run_verify(VerifyConfig(path=str(tmp_path / "episode.zarr"))).exit_code == 0


def test_random_policy_in_real_time_with_cameras(tmp_path):
    cfg = RunConfig(
        policy=PolicyConfig(name="random"),
        loop=LoopConfig(mode="real", max_ticks=30, scheduler=SchedulerConfig(strategy="naive_async")),
        task="move_slider_left",
        stop_on_success=False,
    )
    s = run(cfg, tmp_path).summary
    assert s["steps"] == 30 and s["mode"] == "real" and s["ticks"] + s["deadline_misses"] >= 30
    assert s["frames_recorded"] == s["ticks"] and s["frames_dropped"] == 0
    store = open_store(tmp_path / "episode.zarr")
    assert store.get_episode(0)["observation.images.static"].shape == (s["ticks"], 96, 96, 3)


def test_bad_input_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="Did you mean 'open_drawer'"):
        RunConfig(task="open_drawr")
    cfg = RunConfig(env=EnvConfig(cameras=False, action_mode="joint"), status=False)
    with pytest.raises(UserError, match="env.action_mode=rel_cartesian"):
        run(cfg, tmp_path)
    with pytest.raises(UserError, match="output directory"):
        run(RunConfig(env=EnvConfig(cameras=False), status=False), None)
