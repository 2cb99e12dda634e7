"""The generated MJCF: kinematics against the Panda data sheet, naming, ranges, variants."""

from __future__ import annotations

import math
import subprocess
import sys

import mujoco
import numpy as np
import pytest

from dreamrt.errors import UserError
from dreamrt.sim import panda, scene
from dreamrt.sim.state import BLOCK_COLORS, SURFACES


def _model(name: str = "D", width: int = 64, height: int = 64) -> mujoco.MjModel:
    return mujoco.MjModel.from_xml_string(scene.build_mjcf(scene.scene_config(name), width, height))


@pytest.mark.parametrize("variant", sorted(scene.SCENES))
def test_every_geom_maps_to_one_surface(variant):
    m = _model(variant)
    surfaces = [scene.geom_surface(m.geom(i).name) for i in range(m.ngeom)]
    assert set(surfaces) <= set(SURFACES)
    # The surfaces the task checks look for are all present.
    for needed in (
        "table",
        "drawer",
        "slider_cabinet",
        "robot",
        "furniture",
        "red_block",
        "blue_block",
        "pink_block",
    ):
        assert needed in surfaces, needed
    # Each block is exactly its own geom.
    for color in BLOCK_COLORS:
        assert surfaces.count(f"{color}_block") == 1


def test_geom_surface_rejects_names_off_the_convention():
    with pytest.raises(ValueError):
        scene.geom_surface("shelf")
    with pytest.raises(ValueError):
        scene.geom_surface("cupboard/shelf")


def test_mjcf_kinematics_match_the_dh_table():
    m = _model()
    d = mujoco.MjData(m)
    adr = [m.joint(f"joint{i}").qposadr[0] for i in range(1, 8)]
    site = m.site("tcp").id
    rng = np.random.default_rng(0)
    for q in [panda.NEUTRAL_QPOS, *rng.uniform(panda.JOINT_LOWER, panda.JOINT_UPPER, (5, 7))]:
        d.qpos[adr] = q
        mujoco.mj_kinematics(m, d)
        pos, rot = panda.forward_kinematics(q, scene.ROBOT_BASE, scene.ROBOT_YAW)
        np.testing.assert_allclose(d.site_xpos[site], pos, atol=1e-6)
        np.testing.assert_allclose(d.site_xmat[site].reshape(3, 3), rot, atol=1e-5)
    # Data-sheet sanity: in the ready pose the hand points straight down, 0.307 m out.
    pos, rot = panda.forward_kinematics(panda.NEUTRAL_QPOS)
    assert pos[0] == pytest.approx(0.307, abs=2e-3)
    np.testing.assert_allclose(rot[:, 2], [0, 0, -1], atol=1e-6)


def test_joint_ranges_and_actuators():
    m = _model()
    for i in range(7):
        j = m.joint(f"joint{i + 1}")
        np.testing.assert_allclose(j.range, [panda.JOINT_LOWER[i], panda.JOINT_UPPER[i]], atol=1e-5)
        assert m.actuator(f"joint{i + 1}").forcerange[1] == panda.TORQUE_LIMIT[i]
    expected = {"slider": 0.28, "drawer": 0.22, "button": 0.02, "switch": 0.088}
    for name, upper in expected.items():
        np.testing.assert_allclose(m.joint(name).range, [0.0, upper])
    for side in ("left", "right"):
        np.testing.assert_allclose(m.joint(f"finger_{side}").range, [0.0, 0.04])
    assert m.opt.timestep == pytest.approx(1 / 240)
    assert m.opt.cone == mujoco.mjtCone.mjCONE_ELLIPTIC


def test_fast_render_settings():
    m = _model(width=160, height=96)
    assert m.vis.quality.shadowsize == 0
    assert m.vis.quality.offsamples == 0
    assert (m.vis.global_.offwidth, m.vis.global_.offheight) == (160, 96)
    assert not m.light_castshadow.any()


def test_landmarks_exist():
    m = _model()
    for name in scene.LANDMARKS:
        assert m.site(name).id >= 0


def test_variants_differ_and_d_matches_calvin_blocks():
    d = scene.scene_config("D")
    np.testing.assert_allclose(d.block_size("red"), [0.07, 0.05, 0.05])
    np.testing.assert_allclose(d.block_size("blue"), [0.05, 0.05, 0.05])
    np.testing.assert_allclose(d.block_size("pink"), [0.10, 0.05, 0.05])
    layouts = {(c.cabinet_x, c.drawer_x, c.button_xy, c.switch_xy) for c in scene.SCENES.values()}
    assert len(layouts) == 4
    looks = {(c.desk_texture, c.desk_rgb1) for c in scene.SCENES.values()}
    assert len(looks) == 4
    for c in scene.SCENES.values():
        assert c.block_size("pink")[1] < 2 * panda.FINGER_TRAVEL  # graspable across its short side


def test_scene_config_validation():
    with pytest.raises(UserError, match="Did you mean 'D'"):
        scene.scene_config("DD")
    with pytest.raises(UserError, match="cabinet_x"):
        scene.SceneConfig(cabinet_x=1.0)
    with pytest.raises(UserError, match="block_scale"):
        scene.SceneConfig(block_scale=2.0)
    with pytest.raises(UserError, match="desk texture"):
        scene.SceneConfig(desk_texture="marble")


def test_slider_spots_are_behind_the_two_halves_of_the_opening():
    cfg = scene.scene_config("A")
    left, right = scene.slider_spot(cfg, "left"), scene.slider_spot(cfg, "right")
    assert left[0] > cfg.cabinet_x > right[0]
    assert left[1] < scene.CABINET_FRONT_Y and right[1] < scene.CABINET_FRONT_Y
    assert math.isclose(left[2], scene.SHELF_Z)


def test_importing_the_package_is_cheap_and_registers_the_env():
    code = (
        "import sys, gymnasium, dreamrt.sim; "
        "assert 'mujoco' not in sys.modules, 'mujoco imported'; "
        "assert dreamrt.sim.ENV_ID in gymnasium.registry; print('ok')"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "ok" in out.stdout


# ---------------------------------------------------------------- rotations and IK
def test_euler_conventions_round_trip():
    from dreamrt.sim import ik

    rng = np.random.default_rng(1)
    for _ in range(20):
        e = rng.uniform([-3, -1.5, -3], [3, 1.5, 3])
        R = ik.euler_to_mat(e)
        np.testing.assert_allclose(ik.mat_to_euler(R), e, atol=1e-9)
        np.testing.assert_allclose(ik.quat_to_mat(ik.euler_to_quat(e)), R, atol=1e-9)
        # Rz(yaw) Ry(pitch) Rx(roll): yaw alone turns x towards y.
    np.testing.assert_allclose(
        ik.euler_to_mat(np.array([0, 0, math.pi / 2])) @ [1, 0, 0], [0, 1, 0], atol=1e-12
    )
    R0 = ik.euler_to_mat(np.array([0.1, 0.2, 0.3]))
    turn = ik.rotation_error(ik.euler_to_mat(np.array([0.1, 0.2, 0.3 + 0.4])), R0)
    np.testing.assert_allclose(turn, [0, 0, 0.4], atol=1e-9)  # a yaw step is a turn about world z


def test_diff_ik_converges_and_stays_in_limits():
    from dreamrt.sim import ik

    m = _model()
    solver = ik.DiffIK(m)
    down = ik.euler_to_mat(np.array([math.pi, 0.0, 0.3]))
    for target in ([0.0, -0.4, 0.1], [0.3, -0.6, 0.2], [-0.25, -0.1, -0.05]):
        q = panda.NEUTRAL_QPOS.copy()
        for _ in range(150):
            q_next = solver.solve(q, np.array(target), down)
            # Per call, each joint moves at most its velocity limit over one 1/30 s period.
            assert np.all(np.abs(q_next - q) <= panda.VELOCITY_LIMIT / 30 + 1e-9)
            q = q_next
            assert np.all(q >= solver.lower - 1e-9) and np.all(q <= solver.upper + 1e-9)
        pos, rot = solver.forward(q)
        assert np.linalg.norm(pos - target) < 3e-3, target
        assert np.linalg.norm(ik.rotation_error(down, rot)) < 1e-2
    # An unreachable target is approached without leaving the joint limits.
    q = panda.NEUTRAL_QPOS.copy()
    for _ in range(100):
        q = solver.solve(q, np.array([0.0, -1.5, 0.2]), down)
    assert np.all(q >= solver.lower - 1e-9) and np.all(q <= solver.upper + 1e-9)
