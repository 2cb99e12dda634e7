"""ScriptedExpert: solves every task category through the Policy interface (observations only),
chains without resets, maps instructions to tasks, and is deterministic for a seed."""

from __future__ import annotations

import os

os.environ.setdefault("MUJOCO_GL", "egl")  # before mujoco is first imported

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from dreamrt.errors import UserError  # noqa: E402
from dreamrt.policies.protocol import Policy  # noqa: E402
from dreamrt.sim import protocol  # noqa: E402
from dreamrt.sim.env import CalvinStyleEnv  # noqa: E402
from dreamrt.sim.expert import (  # noqa: E402
    GRASP_CLEARANCE,
    ExpertNoise,
    ScriptedExpert,
    drawer_blocks,
    drawer_grasp,
    task_for_instruction,
)
from dreamrt.sim.language import eval_instruction, train_instructions  # noqa: E402
from dreamrt.sim.motion import Landmarks  # noqa: E402
from dreamrt.sim.scene import LANDMARKS  # noqa: E402
from dreamrt.sim.state import BLOCK_COLORS, SymbolicState  # noqa: E402
from dreamrt.sim.tasks import CATEGORIES, category_of, check_success, task_names  # noqa: E402

MAX_STEPS = 360


def _state(drawer="closed", slider="right", led=0, lightbulb=0, **blocks) -> SymbolicState:
    where = {"red": "table", "blue": "table", "pink": "slider_left"}
    where.update(blocks)
    return SymbolicState(led=led, lightbulb=lightbulb, slider=slider, drawer=drawer, blocks=where)


# One task per category, each from a state where the protocol may ask for it.
CASES = [
    ("rotate_red_block_left", _state()),
    ("push_blue_block_right", _state()),
    ("move_slider_left", _state(slider="right")),
    ("open_drawer", _state(drawer="closed")),
    ("lift_pink_block_table", _state(red="slider_right", pink="table")),
    ("lift_pink_block_slider", _state(slider="right")),
    ("lift_blue_block_drawer", _state(drawer="open", blue="drawer")),
    ("place_in_slider", _state(slider="left", red="grasped")),
    ("stack_block", _state(red="grasped", pink="slider_right")),
    ("unstack_block", _state(red="stacked", pink="slider_right")),
    ("turn_on_led", _state(led=0)),
    ("push_into_drawer", _state(drawer="open", red="slider_right")),
]


@pytest.fixture(scope="module")
def env():
    env = CalvinStyleEnv(cameras=False)
    yield env
    env.close()


def _run(env, expert, task, obs):
    """Steps until the task's check fires; returns (success, steps, last observation)."""
    start = env.scene_state()
    env.set_instruction(eval_instruction(task))
    obs = dict(obs, task=eval_instruction(task))
    for step in range(MAX_STEPS):
        obs, _, _, _, info = env.step(expert.act(obs).actions[0])
        if check_success(task, start, info["scene_state"]):
            return True, step + 1, obs
    return False, MAX_STEPS, obs


def test_cases_cover_every_category():
    assert {category_of(task) for task, _ in CASES} == set(CATEGORIES)
    for task, state in CASES:
        assert protocol.precondition_holds(task, state), task


@pytest.mark.parametrize("task,state", CASES, ids=[t for t, _ in CASES])
def test_expert_solves_a_task_of_each_category(env, task, state):
    expert = ScriptedExpert("D")
    for seed in (0, 1):
        obs, _ = env.reset(
            seed=seed, options={"symbolic_state": state, "instruction": eval_instruction(task)}
        )
        expert.reset(seed)
        ok, steps, _ = _run(env, expert, task, obs)
        assert ok, f"{task} failed from {state} (seed {seed})"
        assert expert.task == task


def test_a_chain_without_reset(env):
    # The arm starts each subtask wherever the last one left it: hooked on the drawer handle,
    # holding a block, inside the drawer.
    chain = [
        "open_drawer",
        "lift_red_block_table",
        "place_in_drawer",
        "turn_on_lightbulb",
        "move_slider_left",
    ]
    state = _state(drawer="closed", slider="right", red="table", blue="slider_right", pink="slider_left")
    for task in chain:
        assert protocol.precondition_holds(task, state), task
        state = protocol.apply_task(task, state)
    obs, _ = env.reset(seed=3, options={"symbolic_state": _state(blue="slider_right", pink="slider_left")})
    expert = ScriptedExpert("D")
    expert.reset(3)
    for task in chain:
        ok, _, obs = _run(env, expert, task, obs)
        assert ok, f"chain failed at {task}"


CROWDED_DRAWER = _state(drawer="open", red="drawer", blue="drawer", pink="drawer")


def _motion_at(env, expert, obs):
    m = expert._motion
    m.obs = obs
    return m


@pytest.mark.parametrize("blocks", [("red", "pink"), ("red", "blue", "pink")])
def test_drawer_blocks_leave_room_for_open_fingers(env, blocks):
    # The open fingers stand 3 cm beside a block's sides; the reset must leave each drawer block
    # a grasp the expert's geometry accepts (2 blocks: spread out; 3: staggered along y).
    where = {
        c: ("drawer" if c in blocks else "slider_right" if c == "blue" else "table") for c in BLOCK_COLORS
    }
    expert = ScriptedExpert("D")
    for seed in range(5):
        obs, _ = env.reset(seed=seed, options={"symbolic_state": _state(drawer="open", **where)})
        m = _motion_at(env, expert, obs)
        assert {b.color for b in drawer_blocks(m, exclude="")} == set(blocks)
        for color in blocks:
            _, clearance = drawer_grasp(m, m.block(color))
            # drawer_grasp settles for a central grasp once the room is about GRASP_CLEARANCE
            assert clearance > GRASP_CLEARANCE / 2, (seed, color, clearance)


@pytest.mark.parametrize("color", BLOCK_COLORS)
def test_lift_from_a_crowded_drawer(env, color):
    task = f"lift_{color}_block_drawer"
    assert protocol.precondition_holds(task, CROWDED_DRAWER)
    expert = ScriptedExpert("D")
    obs, _ = env.reset(
        seed=7, options={"symbolic_state": CROWDED_DRAWER, "instruction": eval_instruction(task)}
    )
    expert.reset(7)
    ok, _, _ = _run(env, expert, task, obs)
    assert ok, task


def test_place_beside_two_blocks_in_the_drawer_keeps_them_graspable(env):
    # The held block goes where it has most room, above the others, and every block in the
    # drawer can be lifted afterwards (the chain continues with lift_*_block_drawer).
    state = _state(drawer="open", red="drawer", blue="drawer", pink="grasped")
    expert = ScriptedExpert("D")
    obs, _ = env.reset(
        seed=2, options={"symbolic_state": state, "instruction": eval_instruction("place_in_drawer")}
    )
    expert.reset(2)
    ok, _, obs = _run(env, expert, "place_in_drawer", obs)
    assert ok
    m = _motion_at(env, expert, obs)
    assert {b.color for b in drawer_blocks(m, exclude="")} == {"red", "blue", "pink"}
    ok, _, _ = _run(env, expert, "lift_blue_block_drawer", obs)
    assert ok


def test_instructions_map_to_tasks():
    for task in task_names():
        assert task_for_instruction(eval_instruction(task)) == task
        for text in train_instructions(task):
            assert task_for_instruction(text) == task
    text = eval_instruction("open_drawer")
    assert task_for_instruction(f"  {text.upper()}. ") == "open_drawer"  # case, spaces, full stop


def test_unknown_instruction_raises_user_error(env):
    expert = ScriptedExpert("D")
    obs, _ = env.reset(seed=0, options={"symbolic_state": _state(), "instruction": "dance a little jig"})
    with pytest.raises(UserError, match="dance a little jig"):
        expert.act(obs)
    with pytest.raises(UserError):
        ScriptedExpert("E")
    with pytest.raises(UserError):
        ExpertNoise(speed_min=0.9, speed_max=0.5)


def test_policy_interface():
    expert = ScriptedExpert("D")
    assert isinstance(expert, Policy)
    assert expert.spec.rate_hz == 30 and expert.spec.action_dim == 7 and expert.spec.horizon == 1
    assert expert.spec.action_mode == "rel_cartesian"


@pytest.mark.parametrize("variant", ["A", "D"])
def test_landmarks_match_the_environment(variant):
    env = CalvinStyleEnv(cameras=False, scene=variant)
    env.reset(seed=4, options={"symbolic_state": _state(drawer="open", slider="left", lightbulb=1)})
    scene_obs = env.scene_state().scene_obs()
    landmarks = Landmarks(variant)
    for name in set(LANDMARKS) - {"tcp"}:  # the tool comes from robot_obs, not from the scene
        np.testing.assert_allclose(landmarks.at(name, scene_obs), env.landmark(name), atol=1e-6, err_msg=name)
    env.close()


def _actions(env, expert, seed, steps=60):
    task = "lift_red_block_table"
    obs, _ = env.reset(seed=seed, options={"symbolic_state": _state(), "instruction": eval_instruction(task)})
    expert.reset(seed)
    out = []
    for _ in range(steps):
        a = expert.act(obs).actions[0]
        out.append(a)
        obs, *_ = env.step(a)
    return np.array(out)


def test_same_seed_gives_the_same_actions_and_noise_changes_them(env):
    plain = _actions(env, ScriptedExpert("D"), seed=5)
    assert np.array_equal(plain, _actions(env, ScriptedExpert("D"), seed=5))
    assert np.all(np.abs(plain[:, :6]) <= 1.0) and set(np.unique(plain[:, 6])) <= {-1.0, 1.0}
    noise = ExpertNoise()
    noisy = _actions(env, ScriptedExpert("D", noise=noise), seed=5)
    assert np.array_equal(noisy, _actions(env, ScriptedExpert("D", noise=noise), seed=5))
    assert not np.allclose(noisy, plain)
    assert not np.allclose(noisy, _actions(env, ScriptedExpert("D", noise=noise), seed=6))


def test_noisy_expert_still_solves_tasks(env):
    expert = ScriptedExpert("D", noise=ExpertNoise())
    for seed, (task, state) in enumerate(CASES[:6]):
        obs, _ = env.reset(
            seed=seed, options={"symbolic_state": state, "instruction": eval_instruction(task)}
        )
        expert.reset(seed)
        ok, _, _ = _run(env, expert, task, obs)
        assert ok, task


def test_expert_speaks_absolute_targets():
    """In an abs_cartesian env the expert sends the target its relative action would have set:
    it still solves the tasks, and roll stays near pi without wrapping."""
    env = CalvinStyleEnv(cameras=False, action_mode="abs_cartesian")
    expert = ScriptedExpert("D", noise=ExpertNoise(), action_mode="abs_cartesian")
    assert expert.spec.action_mode == "abs_cartesian"
    for seed, (task, state) in enumerate([CASES[0], CASES[3], CASES[10]]):
        obs, _ = env.reset(
            seed=seed, options={"symbolic_state": state, "instruction": eval_instruction(task)}
        )
        expert.reset(seed)
        start = env.scene_state()
        obs = dict(obs, task=eval_instruction(task))
        actions = []
        for _ in range(MAX_STEPS):
            a = expert.act(obs).actions[0]
            actions.append(a)
            obs, _, _, _, info = env.step(a)
            # The env's target is the commanded one (workspace clipping aside), and the tool follows it.
            assert np.linalg.norm(obs["observation.state"][:3] - a[:3]) < 0.05
            if check_success(task, start, info["scene_state"]):
                break
        else:
            raise AssertionError(f"{task} not solved with absolute actions")
        roll = np.array(actions)[:, 3]
        assert np.all(np.abs(roll - np.pi) < 0.6) and np.abs(np.diff(roll)).max() < 0.3
    env.close()
    with pytest.raises(UserError, match="env.action_mode=rel_cartesian"):
        ScriptedExpert("D", action_mode="joint")
