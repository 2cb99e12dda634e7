"""CalvinStyleEnv: gymnasium contract, resets into symbolic states, actions, images, and the
physical interactions a scripted expert relies on (grasp, drawer, button, switch)."""

from __future__ import annotations

import math
import os

os.environ.setdefault("MUJOCO_GL", "egl")  # before mujoco is first imported

import gymnasium  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from gymnasium.utils.env_checker import check_env  # noqa: E402

import dreamrt.sim  # noqa: E402
from dreamrt.errors import UserError  # noqa: E402
from dreamrt.sim import panda, scene  # noqa: E402
from dreamrt.sim.env import CalvinStyleEnv, EnvConfig, random_symbolic_state  # noqa: E402
from dreamrt.sim.state import BLOCK_COLORS, SceneState, SymbolicState  # noqa: E402


def _sym(**kw) -> SymbolicState:
    base = dict(
        led=0,
        lightbulb=0,
        slider="right",
        drawer="closed",
        blocks={"red": "table", "blue": "table", "pink": "slider_left"},
    )
    base.update(kw)
    return SymbolicState(**base)


def _wrap(a):
    return (a + math.pi) % (2 * math.pi) - math.pi


def _steer(env, pos, yaw=None, grip=1.0, steps=60, tol=0.004):
    """Relative actions that steer the env's target pose to ``pos`` (hand pointing down)."""
    if yaw is not None:  # the gripper is symmetric: take the nearer of yaw and yaw + pi
        ty = env.target_pose[1][2]
        yaw = min((yaw, yaw + math.pi, yaw - math.pi), key=lambda y: abs(_wrap(y - ty)))
    info = None
    for _ in range(steps):
        tp, te = env.target_pose
        a = np.zeros(7)
        a[:3] = np.clip((np.asarray(pos) - tp) / 0.02, -1, 1)
        if yaw is not None:
            a[3] = np.clip(_wrap(math.pi - te[0]) / 0.05, -1, 1)
            a[4] = np.clip(-te[1] / 0.05, -1, 1)
            a[5] = np.clip(_wrap(yaw - te[2]) / 0.05, -1, 1)
        a[6] = grip
        _, _, _, _, info = env.step(a)
        if np.linalg.norm(np.asarray(pos) - env.tcp_pose()[0]) < tol and np.abs(a[:6]).max() < 0.05:
            break
    return info


def _hold(env, grip, steps):
    info = None
    for _ in range(steps):
        _, _, _, _, info = env.step(np.r_[np.zeros(6), grip])
    return info


@pytest.fixture(scope="module")
def blind_env():
    env = CalvinStyleEnv(cameras=False)
    yield env
    env.close()


# ---------------------------------------------------------------- gymnasium contract
@pytest.mark.filterwarnings("ignore:.*Box observation space m.*infinity")  # robot/scene state is unbounded
def test_check_env_and_make():
    env = gymnasium.make(
        dreamrt.sim.ENV_ID, static_height=32, static_width=32, gripper_height=24, gripper_width=24
    )
    check_env(env.unwrapped)
    obs, info = env.reset(seed=0)
    assert env.observation_space.contains(obs)
    assert isinstance(info["scene_state"], SceneState)
    env.close()


def test_observation_keys_and_spaces():
    env = CalvinStyleEnv(depth=True, segmentation=True)
    obs, _ = env.reset(seed=0, options={"instruction": "open the drawer"})
    assert list(obs) == env.observation_keys()
    assert obs["observation.state"].shape == (15,) and obs["observation.state"].dtype == np.float32
    assert obs["observation.environment_state"].shape == (24,)
    assert (
        obs["observation.images.static"].shape == (96, 96, 3)
        and obs["observation.images.static"].dtype == np.uint8
    )
    assert obs["observation.images.gripper"].shape == (64, 64, 3)
    assert (
        obs["observation.depth.static"].shape == (96, 96, 1)
        and obs["observation.depth.static"].dtype == np.float32
    )
    assert obs["observation.segmentation.gripper"].shape == (64, 64, 1)
    assert obs["observation.segmentation.static"].dtype == np.int32
    assert obs["task"] == "open the drawer"
    assert env.observation_space.contains(obs)
    env.close()


def test_images_are_not_blank_and_depth_and_segmentation_make_sense():
    env = CalvinStyleEnv(depth=True, segmentation=True)
    obs, info = env.reset(
        seed=1,
        options={"symbolic_state": _sym(blocks={"red": "table", "blue": "table", "pink": "slider_right"})},
    )
    for cam in ("static", "gripper"):
        img = obs[f"observation.images.{cam}"]
        assert img.std() > 10, f"{cam} image looks blank"
        depth = obs[f"observation.depth.{cam}"]
        assert np.isfinite(depth).all() and depth.min() > 0.005
    # The static camera sits about 1.3 m from the desk centre and sees the desk top below it.
    depth = obs["observation.depth.static"][..., 0]
    assert 0.9 < float(np.median(depth)) < 2.0
    seg = obs["observation.segmentation.static"][..., 0]
    seen = set(np.unique(seg).tolist())
    assert env.model.body("red_block").id in seen  # on the table left of the arm, in plain view
    assert env.model.body("pink_block").id not in seen  # behind the closed right half of the door
    assert env.model.body("desk").id in seen
    # The red block's pixels are red.
    red = obs["observation.images.static"][seg == env.model.body("red_block").id]
    assert red.shape[0] > 5 and (red[:, 0].astype(int) - red[:, 2].astype(int)).mean() > 60
    env.close()


def test_render_mode_rgb_array_without_observation_cameras():
    env = CalvinStyleEnv(cameras=False, render_mode="rgb_array")
    obs, _ = env.reset(seed=0)
    assert "observation.images.static" not in obs
    frame = env.render()
    assert frame.shape == (96, 96, 3) and frame.std() > 10
    env.close()


def test_determinism_for_a_seed():
    def rollout():
        env = CalvinStyleEnv(static_height=32, static_width=32, gripper_height=24, gripper_width=24)
        obs, _ = env.reset(seed=123)
        env.action_space.seed(7)
        frames = [obs]
        for _ in range(15):
            obs, *_ = env.step(env.action_space.sample())
            frames.append(obs)
        env.close()
        return frames

    a, b = rollout(), rollout()
    for oa, ob in zip(a, b):
        for key in oa:
            if key == "task":
                assert oa[key] == ob[key]
            else:
                np.testing.assert_array_equal(oa[key], ob[key])


def test_seeds_vary_the_start(blind_env):
    first, _ = blind_env.reset(seed=1)
    second, _ = blind_env.reset(seed=2)
    assert not np.allclose(first["observation.state"], second["observation.state"])


def test_rewards_zero_no_termination_and_truncation():
    env = CalvinStyleEnv(cameras=False, max_episode_steps=3)
    env.reset(seed=0)
    results = [env.step(env.action_space.sample())[1:4] for _ in range(3)]
    assert [r for r, _, _ in results] == [0.0, 0.0, 0.0]
    assert [t for _, t, _ in results] == [False, False, False]
    assert [tr for _, _, tr in results] == [False, False, True]
    env.close()


def test_bad_inputs_raise_user_errors(blind_env):
    with pytest.raises(UserError, match="Did you mean 'action_mode'"):
        CalvinStyleEnv(action_mod="joint")
    with pytest.raises(UserError, match="action mode"):
        EnvConfig(action_mode="velocity")
    with pytest.raises(UserError, match="Did you mean 'symbolic_state'"):
        blind_env.reset(options={"symbolic_states": None})
    blind_env.reset(seed=0)
    with pytest.raises(UserError, match="7 finite numbers"):
        blind_env.step(np.zeros(6))
    with pytest.raises(UserError, match="outside the allowed set"):
        blind_env.set_instruction("open the drawer\n")
    with pytest.raises(UserError, match="joint limits"):
        blind_env.reset(options={"robot_qpos": np.zeros(7)})  # q4 = 0 is past its limit
    with pytest.raises(UserError, match="holds at most one block"):
        blind_env.reset(
            options={"symbolic_state": _sym(blocks={"red": "grasped", "blue": "grasped", "pink": "table"})}
        )
    with pytest.raises(UserError, match="no block on the table"):
        blind_env.reset(
            options={
                "symbolic_state": _sym(blocks={"red": "stacked", "blue": "drawer", "pink": "slider_left"})
            }
        )


def test_set_instruction_changes_task_without_reset():
    env = CalvinStyleEnv(cameras=False)
    obs, _ = env.reset(seed=0, options={"instruction": "push the red block left"})
    assert obs["task"] == "push the red block left"
    env.set_instruction("turn on the lightbulb")
    obs, *_ = env.step(np.r_[np.zeros(6), 1.0])
    assert obs["task"] == "turn on the lightbulb"
    env.close()


# ---------------------------------------------------------------- resets into symbolic states
def test_random_symbolic_states_cover_calvins_start_states():
    rng = np.random.default_rng(0)
    seen = [random_symbolic_state(rng) for _ in range(3000)]
    keys = {(s.led, s.lightbulb, s.slider, s.drawer, tuple(sorted(s.blocks.items()))) for s in seen}
    assert len(keys) == 192
    for s in seen:
        where = list(s.blocks.values())
        assert 1 <= where.count("table") <= 2
        assert where.count("slider_left") <= 1 and where.count("slider_right") <= 1


@pytest.mark.parametrize(
    "sym",
    [
        _sym(led=1, lightbulb=0, slider="left", drawer="open"),
        _sym(
            led=0,
            lightbulb=1,
            slider="right",
            drawer="closed",
            blocks={"red": "slider_right", "blue": "table", "pink": "slider_left"},
        ),
        _sym(drawer="open", blocks={"red": "drawer", "blue": "table", "pink": "drawer"}),
        _sym(blocks={"red": "table", "blue": "stacked", "pink": "grasped"}),
    ],
)
def test_reset_realises_the_symbolic_state(blind_env, sym):
    obs, info = blind_env.reset(seed=5, options={"symbolic_state": sym})
    state = info["scene_state"]
    np.testing.assert_allclose(obs["observation.environment_state"], state.scene_obs().astype(np.float32))
    assert info["symbolic_state"] == sym
    assert (state.slider > 0.26) == (sym.slider == "left") and (state.slider < 0.02) == (
        sym.slider == "right"
    )
    assert (state.drawer > 0.2) == (sym.drawer == "open") and (state.drawer < 0.02) == (
        sym.drawer == "closed"
    )
    assert state.lightbulb == sym.lightbulb and state.led == sym.led
    assert state.button == pytest.approx(0.0, abs=1e-3)
    cfg = blind_env.scene_config
    for color, where in sym.blocks.items():
        block = state.blocks[color]
        half_h = cfg.block_size(color)[2] / 2
        if where == "table":
            assert "table" in block.contacts
            assert block.pos[2] == pytest.approx(half_h, abs=3e-3)
        elif where.startswith("slider"):
            assert block.contacts == {"slider_cabinet"}
            assert block.pos[2] == pytest.approx(scene.SHELF_Z + half_h, abs=3e-3)
            assert block.pos[1] < scene.CABINET_FRONT_Y
            side = 1 if where == "slider_left" else -1
            assert side * (block.pos[0] - cfg.cabinet_x) > 0.05
        elif where == "drawer":
            assert block.contacts == {"drawer"}
            assert block.pos[2] == pytest.approx(scene.DRAWER_FLOOR_Z + half_h, abs=3e-3)
            assert abs(block.pos[0] - cfg.drawer_x) < scene.DRAWER_HALF[0]
        elif where == "stacked":
            assert block.contacts == {"red_block"}
        elif where == "grasped":
            assert block.contacts == {"robot"}
            assert np.linalg.norm(block.pos - state.tcp_pos) < 0.01
            assert state.gripper_width == pytest.approx(cfg.block_size(color)[1], abs=3e-3)
        # Resets leave blocks at rest.
        assert np.linalg.norm(block.lin_vel) < 0.01
    # The snapshot agrees with robot_obs.
    np.testing.assert_allclose(obs["observation.state"][:3], state.tcp_pos, atol=1e-6)
    assert obs["observation.state"][6] == pytest.approx(state.gripper_width, abs=1e-6)


def test_table_blocks_do_not_overlap(blind_env):
    sym = _sym(blocks={c: "table" for c in BLOCK_COLORS})
    for seed in range(10):
        _, info = blind_env.reset(seed=seed, options={"symbolic_state": sym})
        for color, block in info["scene_state"].blocks.items():
            assert block.contacts == {"table"}, (seed, color, block.contacts)


def test_robot_qpos_option(blind_env):
    q = np.array([0.2, -0.3, 0.1, -2.4, 0.0, 2.2, 0.5])
    obs, _ = blind_env.reset(seed=0, options={"robot_qpos": q})
    np.testing.assert_allclose(obs["observation.state"][7:14], q, atol=2e-3)


# ---------------------------------------------------------------- actions
@pytest.mark.parametrize("axis,sign", [(0, 1), (0, -1), (2, 1), (2, -1), (1, 1)])
def test_relative_action_moves_the_tcp(blind_env, axis, sign):
    blind_env.reset(seed=1, options={"symbolic_state": _sym()})
    p0, e0 = blind_env.tcp_pose()
    a = np.zeros(7)
    a[axis], a[6] = sign, 1.0
    for _ in range(5):
        blind_env.step(a)
    _hold(blind_env, 1.0, 3)
    moved = blind_env.tcp_pose()[0] - p0
    assert moved[axis] == pytest.approx(sign * 5 * 0.02, abs=0.01)
    assert np.linalg.norm(np.delete(moved, axis)) < 0.01
    assert np.abs(_wrap(blind_env.tcp_pose()[1] - e0)).max() < 0.03


def test_relative_yaw_turns_the_hand(blind_env):
    blind_env.reset(seed=1, options={"symbolic_state": _sym()})
    p0, e0 = blind_env.tcp_pose()
    for _ in range(6):
        blind_env.step(np.array([0, 0, 0, 0, 0, 1.0, 1.0]))
    _hold(blind_env, 1.0, 3)
    p1, e1 = blind_env.tcp_pose()
    assert _wrap(e1[2] - e0[2]) == pytest.approx(6 * 0.05, abs=0.02)
    assert np.linalg.norm(p1 - p0) < 0.01


def test_absolute_and_joint_action_modes():
    env = CalvinStyleEnv(cameras=False, action_mode="abs_cartesian")
    env.reset(seed=0)
    goal = np.array([0.1, -0.35, 0.2, math.pi, 0.0, 0.3, 1.0])
    for _ in range(40):
        env.step(goal)
    pos, euler = env.tcp_pose()
    np.testing.assert_allclose(pos, goal[:3], atol=5e-3)
    assert abs(_wrap(euler[2] - 0.3)) < 0.02
    env.close()

    env = CalvinStyleEnv(cameras=False, action_mode="joint")
    env.reset(seed=0)
    q_goal = np.array([0.3, -0.2, 0.1, -2.2, 0.1, 2.0, 0.2])
    for _ in range(40):
        env.step(np.r_[q_goal, -1.0])
    np.testing.assert_allclose(env.robot_obs()[7:14], q_goal, atol=5e-3)
    assert env.gripper_width() < 0.002  # closed on nothing
    env.close()


def test_joint_limits_hold_under_extreme_commands():
    env = CalvinStyleEnv(cameras=False, action_mode="joint")
    env.reset(seed=0)
    beyond = np.r_[panda.JOINT_UPPER + 1.0, 1.0].astype(np.float32)
    for target in (np.minimum(beyond, env.action_space.high), env.action_space.low):
        for _ in range(60):
            env.step(target)
            q = env.robot_obs()[7:14]
            assert np.all(q >= panda.JOINT_LOWER - 0.01) and np.all(q <= panda.JOINT_UPPER + 0.01)
    env.close()
    env = CalvinStyleEnv(cameras=False)
    env.reset(seed=0)
    for a in (np.array([1, 0, 1, 0, 0, 1, 1.0]), np.array([0, -1, -1, 1, 0, -1, 1.0])):
        for _ in range(80):
            env.step(a)
            q = env.robot_obs()[7:14]
            assert np.all(q >= panda.JOINT_LOWER - 0.01) and np.all(q <= panda.JOINT_UPPER + 0.01)
    env.close()


def test_gripper_opens_and_closes(blind_env):
    blind_env.reset(seed=0, options={"symbolic_state": _sym()})
    assert blind_env.gripper_width() == pytest.approx(0.08, abs=1e-3)
    obs = None
    for _ in range(8):
        obs, *_ = blind_env.step(np.r_[np.zeros(6), -1.0])
    assert blind_env.gripper_width() < 0.002
    assert obs["observation.state"][14] == -1.0
    for _ in range(8):
        obs, *_ = blind_env.step(np.r_[np.zeros(6), 1.0])
    assert blind_env.gripper_width() == pytest.approx(0.08, abs=2e-3)
    assert obs["observation.state"][14] == 1.0


# ---------------------------------------------------------------- contacts and physics
def test_resting_block_reports_table_contact(blind_env):
    _, info = blind_env.reset(seed=3, options={"symbolic_state": _sym()})
    _hold(blind_env, 1.0, 10)
    for color in ("red", "blue"):
        block = blind_env.scene_state().blocks[color]
        assert block.contacts == {"table"}
        assert np.linalg.norm(block.lin_vel) < 1e-3


@pytest.mark.parametrize("variant", ["A", "D"])
def test_grasp_and_lift_a_block(variant):
    env = CalvinStyleEnv(cameras=False, scene=variant)
    _, info = env.reset(seed=2, options={"symbolic_state": _sym()})
    for color in ("pink", "blue"):
        env.reset(
            seed=2,
            options={"symbolic_state": _sym(blocks={"red": "table", "blue": "table", "pink": "table"})},
        )
        block = env.scene_state().blocks[color]
        yaw = block.euler[2]
        _steer(env, block.pos + [0, 0, 0.1], yaw=yaw, steps=80)
        _steer(env, block.pos, yaw=yaw)
        _hold(env, -1.0, 12)
        _steer(env, block.pos + [0, 0, 0.12], grip=-1.0)
        state = _hold(env, -1.0, 20)["scene_state"]
        lifted = state.blocks[color]
        assert lifted.pos[2] - block.pos[2] > 0.1, color
        assert lifted.contacts == {"robot"}, color
        assert state.gripper_width == pytest.approx(env.scene_config.block_size(color)[1], abs=3e-3)
    env.close()


def test_hooking_the_handle_opens_and_pushing_closes_the_drawer(blind_env):
    blind_env.reset(seed=0, options={"symbolic_state": _sym(drawer="closed")})
    assert blind_env.scene_state().drawer < 0.02
    # Closed fingers between the drawer's front plate and its handle bar, then pull.
    hook = blind_env.landmark("drawer_handle") - [0, 0.032, 0.01]
    _steer(blind_env, hook + [0, 0, 0.12], yaw=math.pi / 2, grip=-1.0, steps=80)
    _steer(blind_env, hook, yaw=math.pi / 2, grip=-1.0)
    _steer(blind_env, hook + [0, 0.24, 0], yaw=math.pi / 2, grip=-1.0)
    assert blind_env.scene_state().drawer > 0.2
    _steer(blind_env, blind_env.tcp_pose()[0] + [0, 0, 0.1], grip=-1.0, steps=20)
    handle = blind_env.landmark("drawer_handle")
    _steer(blind_env, handle + [0, 0.03, 0.06], yaw=math.pi / 2, grip=-1.0)
    _steer(blind_env, handle + [0, 0.03, 0.0], yaw=math.pi / 2, grip=-1.0, steps=30)
    _steer(blind_env, handle + [0, -0.25, 0.0], yaw=math.pi / 2, grip=-1.0)
    assert blind_env.scene_state().drawer < 0.02


def test_pressing_the_button_toggles_the_led(blind_env):
    blind_env.reset(seed=0, options={"symbolic_state": _sym(led=0)})
    top = blind_env.landmark("button_top")
    _steer(blind_env, top + [0, 0, 0.08], grip=-1.0, steps=80)
    for expected in (1, 0):
        _steer(blind_env, top + [0, 0, -0.021], grip=-1.0, steps=20)
        pressed = blind_env.scene_state()
        assert scene.BUTTON_RANGE / 2 < pressed.button < scene.BUTTON_RANGE + 2e-3
        _steer(blind_env, top + [0, 0, 0.06], grip=-1.0, steps=20)
        released = _hold(blind_env, -1.0, 10)["scene_state"]
        assert released.button < 1e-3  # the spring brings it back
        assert released.led == expected
    # The LED's look follows its state.
    assert (
        blind_env.model.geom_matid[blind_env.model.geom("furniture/led").id]
        == blind_env.model.material("led_off").id
    )


def test_raising_the_switch_turns_on_the_lightbulb(blind_env):
    blind_env.reset(seed=0, options={"symbolic_state": _sym(lightbulb=0)})
    assert blind_env.scene_state().lightbulb == 0
    lever = blind_env.landmark("switch_lever")
    _steer(blind_env, lever + [0, 0, 0.12], yaw=math.pi / 2, steps=80)
    _steer(blind_env, lever, yaw=math.pi / 2)
    _hold(blind_env, -1.0, 10)
    _steer(blind_env, lever + [0, 0, 0.095], yaw=math.pi / 2, grip=-1.0)
    state = _hold(blind_env, 1.0, 10)["scene_state"]
    assert state.switch > scene.SWITCH_RANGE / 2
    assert state.lightbulb == 1
    assert (
        blind_env.model.geom_matid[blind_env.model.geom("furniture/lightbulb").id]
        == blind_env.model.material("bulb_on").id
    )


def test_sliding_the_door(blind_env):
    blind_env.reset(seed=0, options={"symbolic_state": _sym(slider="right")})
    handle = blind_env.landmark("slider_handle")
    _steer(blind_env, handle + [0, 0, 0.12], yaw=math.pi / 2, steps=80)
    _steer(blind_env, handle, yaw=math.pi / 2)
    _hold(blind_env, -1.0, 10)
    _steer(blind_env, handle + [0.28, 0, 0], yaw=math.pi / 2, grip=-1.0)
    assert blind_env.scene_state().slider > 0.26


@pytest.mark.parametrize("sign", [1, -1])
def test_pushing_a_block_along_x_keeps_it_on_the_table(blind_env, sign):
    blind_env.reset(seed=5, options={"symbolic_state": _sym()})
    start = blind_env.scene_state().blocks["red"]
    behind = start.pos + [-sign * 0.07, 0, 0]  # closed fingertips just above the table, behind the block
    _steer(blind_env, behind + [0, 0, 0.1], yaw=0.0, grip=-1.0, steps=80)
    _steer(blind_env, behind + [0, 0, 0.005], yaw=0.0, grip=-1.0)
    _steer(blind_env, behind + [sign * 0.18, 0, 0.005], yaw=0.0, grip=-1.0)
    _steer(blind_env, blind_env.tcp_pose()[0] + [0, 0, 0.1], grip=-1.0, steps=20)
    end = _hold(blind_env, -1.0, 20)["scene_state"].blocks["red"]
    assert sign * (end.pos[0] - start.pos[0]) > 0.1
    assert end.contacts == {"table"}


@pytest.mark.parametrize("sign", [1, -1])
def test_rotating_a_grasped_block(blind_env, sign):
    blind_env.reset(seed=6, options={"symbolic_state": _sym()})
    start = blind_env.scene_state().blocks["blue"]
    yaw = start.euler[2]
    _steer(blind_env, start.pos + [0, 0, 0.1], yaw=yaw, steps=80)
    _steer(blind_env, start.pos, yaw=yaw)
    _hold(blind_env, -1.0, 12)
    _steer(blind_env, start.pos + [0, 0, 0.01], yaw=blind_env.target_pose[1][2] + sign * 1.4, grip=-1.0)
    _hold(blind_env, 1.0, 10)
    _steer(blind_env, blind_env.tcp_pose()[0] + [0, 0, 0.1], grip=1.0, steps=20)
    end = _hold(blind_env, 1.0, 20)["scene_state"].blocks["blue"]
    assert sign * _wrap(end.euler[2] - start.euler[2]) > math.radians(60)
    assert np.abs(end.euler[:2]).max() < math.radians(10)
    assert np.linalg.norm(end.pos - start.pos) < 0.05
    assert end.contacts == {"table"}


def test_start_pose_constant_matches_its_documented_tool_pose(blind_env):
    from dreamrt.sim.env import START_QPOS, START_TCP

    pos, rot = panda.forward_kinematics(START_QPOS, scene.ROBOT_BASE, scene.ROBOT_YAW)
    np.testing.assert_allclose(pos, START_TCP, atol=2e-3)
    np.testing.assert_allclose(rot[:, 2], [0, 0, -1], atol=1e-3)  # pointing down
    assert abs(rot[:, 1] @ [0, 1, 0]) > 0.999  # fingers slide along world y


def test_depth_matches_mujoco_ray_casting():
    import mujoco

    env = CalvinStyleEnv(depth=True, static_height=33, static_width=33, gripper_height=33, gripper_width=33)
    obs, _ = env.reset(seed=0)
    m, d = env.model, env.data
    for cam in ("static", "gripper"):
        cid = m.camera(cam).id
        axis = -d.cam_xmat[cid].reshape(3, 3)[:, 2]  # cameras look along their -z
        geom = np.zeros(1, np.int32)
        dist = mujoco.mj_ray(m, d, d.cam_xpos[cid], axis, None, 1, -1, geom)
        assert dist > 0
        # The centre pixel of an odd-sized image lies on the optical axis.
        assert obs[f"observation.depth.{cam}"][16, 16, 0] == pytest.approx(dist, rel=0.02, abs=2e-3)
    env.close()
