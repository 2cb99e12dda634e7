"""``CalvinStyleEnv``: the CALVIN-style tabletop as a gymnasium environment.

Physics runs at 240 Hz and control at 30 Hz (8 substeps per ``step``). Three action modes:

- ``rel_cartesian`` (default, CALVIN's ``rel_actions``): 7 numbers in [-1, 1]: dx, dy, dz
  (x 0.02 m), droll, dpitch, dyaw (x 0.05 rad, added to the target's Euler angles) and the
  gripper (> 0 open, otherwise close). The deltas accumulate onto a target pose, which is
  kept within 0.03 m / 0.3 rad of the actual tool pose so that pushing against something
  cannot wind it up.
- ``abs_cartesian``: target xyz (m), roll, pitch, yaw (rad), gripper.
- ``joint``: seven joint targets (rad) and the gripper.

Cartesian targets become joint targets by damped-least-squares IK (:mod:`dreamrt.sim.ik`)
from the last commanded joints; every joint target moves at most its velocity limit per
control period and stays inside the joint limits. The servo setpoints are interpolated
across the 8 substeps.

Observations are a ``Dict`` with LeRobot-style keys (see :meth:`CalvinStyleEnv.observation_keys`);
``info["scene_state"]`` is a :class:`~dreamrt.sim.state.SceneState` snapshot. Rewards are 0 and
the environment never terminates on its own: the task protocol decides success. Truncation
happens after ``EnvConfig.max_episode_steps`` steps (``None`` = never).

Public helpers for scripted experts and task checks: :meth:`scene_state`, :meth:`tcp_pose`,
:meth:`robot_obs`, :meth:`landmark`, :meth:`set_instruction`, :attr:`model`, :attr:`data`,
:attr:`target_pose`.
"""

from __future__ import annotations

import math
import string
from collections import OrderedDict
from dataclasses import dataclass, fields

import gymnasium as gym
import mujoco
import numpy as np
from gymnasium import spaces

from dreamrt.errors import UserError, choose, reject_unknown_options
from dreamrt.sim import ik, panda, protocol, scene
from dreamrt.sim.render import CameraRig, CameraSpec, strip_size
from dreamrt.sim.state import BLOCK_COLORS, SURFACES, BlockState, SceneState, SymbolicState

CONTROL_HZ = 30
SUBSTEPS = 8  # 240 Hz physics
REL_POS_SCALE = 0.02  # metres per unit of relative action
REL_ROT_SCALE = 0.05  # radians per unit of relative action
MAX_TARGET_LEAD = 0.03  # metres the relative target may run ahead of the actual tool
MAX_TARGET_TURN = 0.3  # radians, likewise for orientation
# Where Cartesian targets may go (x, y, z ranges): the desk, the cabinet and the open drawer.
WORKSPACE = ((-0.75, 0.75), (-0.80, 0.12), (-0.13, 0.85))

# Start pose: tool 0.30 m above the desk at (0, -0.38), pointing down, fingers along world y,
# so blocks lying along x can be grasped across their 0.05 m side without turning the hand.
START_QPOS = np.array([0.0, -0.4867, 0.0, -2.6343, 0.0, 2.1473, -math.pi / 4])
START_TCP = np.array([0.0, -0.38, 0.30])

BUTTON_MIDPOINT = scene.BUTTON_RANGE / 2
SWITCH_MIDPOINT = scene.SWITCH_RANGE / 2
ACTION_MODES = ("rel_cartesian", "abs_cartesian", "joint")
INSTRUCTION_CHARSET = string.ascii_letters + string.digits + string.punctuation + " "
INSTRUCTION_MAX_LENGTH = 256

# Drawer blocks: open fingers stand about 0.03 m beside a block's sides, so neighbours closer
# than DRAWER_FINGER_ROOM alternate along y by DRAWER_STAGGER (m from the drawer's centre; the
# second entry towards the robot), which leaves each one a stretch with no neighbour beside it.
DRAWER_FINGER_ROOM = 0.035
DRAWER_STAGGER = (-0.04, 0.045)
OPTION_KEYS = ("symbolic_state", "instruction", "robot_qpos")


@dataclass
class EnvConfig:
    """Options of :class:`CalvinStyleEnv` (also accepted as keyword arguments by ``gymnasium.make``)."""

    scene: str = "D"  # scene variant "A".."D"; D is the evaluation scene
    cameras: bool = True  # render observation.images.* (and depth/segmentation when on)
    static_height: int = 96
    static_width: int = 96
    gripper_height: int = 64
    gripper_width: int = 64
    depth: bool = False  # add observation.depth.{static,gripper}, float32 metres, (H, W, 1)
    segmentation: bool = False  # add observation.segmentation.{static,gripper}, int32 body ids, (H, W, 1)
    action_mode: str = "rel_cartesian"  # one of ACTION_MODES
    max_episode_steps: int | None = None  # truncate after this many steps; None = never
    robot_noise: float = 0.02  # rad, half-width of the uniform noise on the start joints
    placement_noise: float = 0.01  # m, half-width of the noise on drawer/slider/cabinet placements
    settle_substeps: int = 60  # physics substeps after a reset so blocks come to rest

    def __post_init__(self) -> None:
        choose("scene variant", self.scene, scene.SCENES)
        choose("action mode", self.action_mode, ACTION_MODES)
        for name in ("static_height", "static_width", "gripper_height", "gripper_width"):
            value = getattr(self, name)
            if not isinstance(value, int) or not 8 <= value <= 1024:
                raise UserError(
                    f"EnvConfig.{name}={value!r} is not a valid image size; expected an int in [8, 1024]."
                )
        if self.max_episode_steps is not None and self.max_episode_steps < 1:
            raise UserError(
                f"EnvConfig.max_episode_steps={self.max_episode_steps} must be a positive int or None (never truncate)."
            )
        if not 0 <= self.robot_noise <= 0.2:
            raise UserError(f"EnvConfig.robot_noise={self.robot_noise} rad; expected a value in [0, 0.2].")
        if not 0 <= self.placement_noise <= 0.03:
            raise UserError(
                f"EnvConfig.placement_noise={self.placement_noise} m; expected a value in [0, 0.03]."
            )
        if self.settle_substeps < 0:
            raise UserError(f"EnvConfig.settle_substeps={self.settle_substeps}; expected a non-negative int.")
        if (self.segmentation or self.depth) and not self.cameras:
            raise UserError("EnvConfig: depth and segmentation need cameras=True.")


def random_symbolic_state(rng: np.random.Generator) -> SymbolicState:
    """One of CALVIN's 192 start states (see ``protocol.start_states``), uniformly."""
    states = protocol.start_states()
    return states[int(rng.integers(len(states)))]


class CalvinStyleEnv(gym.Env):
    """CALVIN-style tabletop with a 7-DoF Panda-like arm; see the module docstring."""

    metadata = {"render_modes": ["rgb_array"], "render_fps": CONTROL_HZ}

    def __init__(self, config: EnvConfig | None = None, render_mode: str | None = None, **overrides):
        if config is not None and overrides:
            raise UserError("CalvinStyleEnv: pass either an EnvConfig or keyword options, not both.")
        if config is None:
            reject_unknown_options("CalvinStyleEnv", overrides, (f.name for f in fields(EnvConfig)))
            config = EnvConfig(**overrides)
        if render_mode is not None and render_mode not in self.metadata["render_modes"]:
            raise UserError(f"render_mode={render_mode!r} is not supported; use None or 'rgb_array'.")
        self.config = config
        self.render_mode = render_mode
        self.scene_config = scene.scene_config(config.scene)

        cams = [CameraSpec("static", config.static_height, config.static_width)]
        if config.cameras:
            cams.append(CameraSpec("gripper", config.gripper_height, config.gripper_width))
        off_w, off_h = strip_size(cams)
        self._model = mujoco.MjModel.from_xml_string(scene.build_mjcf(self.scene_config, off_w, off_h))
        self._data = mujoco.MjData(self._model)
        self._ik = ik.DiffIK(self._model, rest_qpos=START_QPOS)
        self._index_model()

        self._rig: CameraRig | None = None
        if config.cameras or render_mode == "rgb_array":
            self._rig = CameraRig(self._model, cams, depth=config.depth, segmentation=config.segmentation)

        self.action_space = self._make_action_space()
        self.observation_space = self._make_observation_space()

        self._q_cmd = START_QPOS.copy()
        self._target_pos = START_TCP.copy()
        self._target_rot = np.eye(3)
        self._gripper_action = 1.0
        self._led = 0
        self._button_prev = 0.0
        self._instruction = ""
        self._steps = 0
        self._start_symbolic: SymbolicState | None = None

    # ------------------------------------------------------------------ model indexing
    def _index_model(self) -> None:
        m = self._model
        self._arm_qadr = np.array([m.joint(f"joint{i}").qposadr[0] for i in range(1, 8)])
        self._arm_dadr = np.array([m.joint(f"joint{i}").dofadr[0] for i in range(1, 8)])
        self._finger_qadr = np.array([m.joint(f"finger_{s}").qposadr[0] for s in ("left", "right")])
        self._arm_act = np.array([m.actuator(f"joint{i}").id for i in range(1, 8)])
        self._grip_act = m.actuator("gripper").id
        self._qadr = {n: m.joint(n).qposadr[0] for n in ("slider", "drawer", "button", "switch")}
        self._block_qadr = {c: m.joint(f"{c}_block").qposadr[0] for c in BLOCK_COLORS}
        self._block_dadr = {c: m.joint(f"{c}_block").dofadr[0] for c in BLOCK_COLORS}
        self._tcp_site = m.site("tcp").id
        self._kv_over_kp = -m.actuator_biasprm[self._arm_act, 2] / m.actuator_gainprm[self._arm_act, 0]
        # Every geom belongs to exactly one surface; contacts are reported through this table.
        self.geom_surface: tuple[str, ...] = tuple(scene.geom_surface(m.geom(i).name) for i in range(m.ngeom))
        self._geom_surface_id = np.array([SURFACES.index(s) for s in self.geom_surface], np.int32)
        self._block_surface_ids = {SURFACES.index(f"{c}_block"): c for c in BLOCK_COLORS}
        self._bulb_geom = m.geom("furniture/lightbulb").id
        self._led_geom = m.geom("furniture/led").id
        self._mat = {n: m.material(n).id for n in ("bulb_on", "bulb_off", "led_on", "led_off")}

    # ------------------------------------------------------------------ spaces
    def _make_action_space(self) -> spaces.Box:
        mode = self.config.action_mode
        if mode == "rel_cartesian":
            return spaces.Box(-1.0, 1.0, (7,), np.float32)
        if mode == "abs_cartesian":
            (x0, x1), (y0, y1), (z0, z1) = WORKSPACE
            low = np.array([x0, y0, z0, -math.pi, -math.pi / 2, -math.pi, -1.0], np.float32)
            high = np.array([x1, y1, z1, math.pi, math.pi / 2, math.pi, 1.0], np.float32)
            return spaces.Box(low, high, dtype=np.float32)
        low = np.concatenate([panda.JOINT_LOWER, [-1.0]]).astype(np.float32)
        high = np.concatenate([panda.JOINT_UPPER, [1.0]]).astype(np.float32)
        return spaces.Box(low, high, dtype=np.float32)

    def _make_observation_space(self) -> spaces.Dict:
        cfg = self.config
        obs = {
            "observation.state": spaces.Box(-np.inf, np.inf, (15,), np.float32),
            "observation.environment_state": spaces.Box(-np.inf, np.inf, (24,), np.float32),
        }
        sizes = {
            "static": (cfg.static_height, cfg.static_width),
            "gripper": (cfg.gripper_height, cfg.gripper_width),
        }
        if cfg.cameras:
            for cam, (h, w) in sizes.items():
                obs[f"observation.images.{cam}"] = spaces.Box(0, 255, (h, w, 3), np.uint8)
            if cfg.depth:
                for cam, (h, w) in sizes.items():
                    obs[f"observation.depth.{cam}"] = spaces.Box(0.0, np.inf, (h, w, 1), np.float32)
            if cfg.segmentation:
                for cam, (h, w) in sizes.items():
                    obs[f"observation.segmentation.{cam}"] = spaces.Box(
                        -1, self._model.nbody - 1, (h, w, 1), np.int32
                    )
        obs["task"] = spaces.Text(
            max_length=INSTRUCTION_MAX_LENGTH, min_length=0, charset=INSTRUCTION_CHARSET
        )
        return spaces.Dict(OrderedDict(obs))  # a plain dict would be sorted by key

    def observation_keys(self) -> list[str]:
        """The observation dictionary's keys, in order."""
        return list(self.observation_space.spaces)

    # ------------------------------------------------------------------ public helpers
    @property
    def model(self) -> mujoco.MjModel:
        """The MuJoCo model (read it freely; changing it changes the simulation)."""
        return self._model

    @property
    def data(self) -> mujoco.MjData:
        """The live MuJoCo data; kinematics and contacts are current after reset() and step()."""
        return self._data

    @property
    def instruction(self) -> str:
        return self._instruction

    @property
    def target_pose(self) -> tuple[np.ndarray, np.ndarray]:
        """The Cartesian target the IK is tracking: (pos (3,), euler (3,))."""
        return self._target_pos.copy(), ik.mat_to_euler(self._target_rot)

    @property
    def start_symbolic_state(self) -> SymbolicState | None:
        """The symbolic state the last reset realised."""
        return self._start_symbolic

    def set_instruction(self, text: str) -> None:
        """Change the language instruction reported as ``task`` (chains do this between subtasks)."""
        if not isinstance(text, str):
            raise UserError(f"instruction must be a str, got {type(text).__name__}.")
        if len(text) > INSTRUCTION_MAX_LENGTH:
            raise UserError(
                f"instruction is {len(text)} characters long; at most {INSTRUCTION_MAX_LENGTH} are allowed."
            )
        bad = sorted(set(text) - set(INSTRUCTION_CHARSET))
        if bad:
            raise UserError(
                f"instruction {text!r} contains characters {bad!r} outside the allowed set "
                "(printable ASCII letters, digits, punctuation and spaces)."
            )
        self._instruction = text

    def tcp_pose(self) -> tuple[np.ndarray, np.ndarray]:
        """The tool centre point now: (pos (3,) metres, euler (3,) roll/pitch/yaw radians), world frame."""
        pos = self._data.site_xpos[self._tcp_site].copy()
        return pos, ik.mat_to_euler(self._data.site_xmat[self._tcp_site].reshape(3, 3))

    def gripper_width(self) -> float:
        """Distance between the finger pads, metres (0 closed, 0.08 fully open)."""
        return float(self._data.qpos[self._finger_qadr].sum())

    def robot_obs(self) -> np.ndarray:
        """CALVIN's 15-d robot observation: tcp xyz, tcp euler, gripper width, 7 joints, gripper action."""
        pos, euler = self.tcp_pose()
        return np.concatenate(
            [pos, euler, [self.gripper_width()], self._data.qpos[self._arm_qadr], [self._gripper_action]]
        )

    def landmark(self, name: str) -> np.ndarray:
        """World xyz (3,) of a named site; see :data:`dreamrt.sim.scene.LANDMARKS` for the names."""
        choose("landmark", name, scene.LANDMARKS)
        return self._data.site_xpos[self._model.site(name).id].copy()

    def lightbulb(self) -> int:
        return int(self._data.qpos[self._qadr["switch"]] > SWITCH_MIDPOINT)

    def led(self) -> int:
        return self._led

    def scene_state(self) -> SceneState:
        """A snapshot of the scene for the task checks (contacts from MuJoCo's contact list)."""
        d = self._data
        touching: dict[str, set[str]] = {c: set() for c in BLOCK_COLORS}
        ncon = d.ncon
        if ncon:
            pairs = self._geom_surface_id[d.contact.geom[:ncon]]  # (ncon, 2) surface ids
            for s1, s2 in pairs:
                c1 = self._block_surface_ids.get(int(s1))
                c2 = self._block_surface_ids.get(int(s2))
                if c1 is not None and s1 != s2:
                    touching[c1].add(SURFACES[s2])
                if c2 is not None and s1 != s2:
                    touching[c2].add(SURFACES[s1])
        blocks = {}
        for c in BLOCK_COLORS:
            qa, da = self._block_qadr[c], self._block_dadr[c]
            blocks[c] = BlockState(
                pos=d.qpos[qa : qa + 3].copy(),
                euler=ik.quat_to_euler(d.qpos[qa + 3 : qa + 7]),
                lin_vel=d.qvel[da : da + 3].copy(),  # a free joint's first 3 dofs: world-frame velocity
                contacts=frozenset(touching[c]),
            )
        return SceneState(
            slider=float(d.qpos[self._qadr["slider"]]),
            drawer=float(d.qpos[self._qadr["drawer"]]),
            button=float(d.qpos[self._qadr["button"]]),
            switch=float(d.qpos[self._qadr["switch"]]),
            lightbulb=self.lightbulb(),
            led=self._led,
            blocks=blocks,
            tcp_pos=d.site_xpos[self._tcp_site].copy(),
            gripper_width=self.gripper_width(),
        )

    # ------------------------------------------------------------------ gymnasium API
    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        options = dict(options or {})
        reject_unknown_options("reset()", options, OPTION_KEYS)
        sym = options.get("symbolic_state")
        if sym is None:
            sym = random_symbolic_state(self.np_random)
        elif not isinstance(sym, SymbolicState):
            raise UserError(f"reset option symbolic_state must be a SymbolicState, got {type(sym).__name__}.")
        self.set_instruction(options.get("instruction", ""))
        rng = self.np_random
        m, d = self._model, self._data
        mujoco.mj_resetData(m, d)

        if options.get("robot_qpos") is not None:
            q = np.asarray(options["robot_qpos"], dtype=np.float64)
            if q.shape != (7,) or not np.all(np.isfinite(q)):
                raise UserError(
                    f"reset option robot_qpos must be 7 finite joint angles, got shape {q.shape}."
                )
            if np.any(q < panda.JOINT_LOWER) or np.any(q > panda.JOINT_UPPER):
                raise UserError(
                    f"reset option robot_qpos={np.round(q, 4).tolist()} is outside the joint limits "
                    f"lower={panda.JOINT_LOWER.tolist()} upper={panda.JOINT_UPPER.tolist()}."
                )
        else:
            noise = self.config.robot_noise
            q = START_QPOS + rng.uniform(-noise, noise, 7)
        q = np.clip(q, self._ik.lower, self._ik.upper)
        d.qpos[self._arm_qadr] = q
        d.qpos[self._finger_qadr] = panda.FINGER_TRAVEL
        self._gripper_action = 1.0

        pn = self.config.placement_noise
        d.qpos[self._qadr["slider"]] = (
            scene.SLIDER_RANGE - rng.uniform(0, pn) if sym.slider == "left" else rng.uniform(0, pn)
        )
        d.qpos[self._qadr["drawer"]] = (
            scene.DRAWER_RANGE - rng.uniform(0, pn) if sym.drawer == "open" else rng.uniform(0, pn)
        )
        d.qpos[self._qadr["switch"]] = (
            scene.SWITCH_RANGE - rng.uniform(0, pn) if sym.lightbulb else rng.uniform(0, pn)
        )
        d.qpos[self._qadr["button"]] = 0.0
        self._led = int(sym.led)
        mujoco.mj_forward(m, d)
        self._place_blocks(sym, rng)

        self._q_cmd = q.copy()
        d.ctrl[self._arm_act] = q
        d.ctrl[self._grip_act] = panda.FINGER_TRAVEL if self._gripper_action > 0 else 0.0
        for _ in range(self.config.settle_substeps):
            mujoco.mj_step(m, d)
        d.qvel[self._arm_dadr] = 0.0
        mujoco.mj_forward(m, d)
        self._target_pos = d.site_xpos[self._tcp_site].copy()
        self._target_rot = d.site_xmat[self._tcp_site].reshape(3, 3).copy()
        self._button_prev = float(d.qpos[self._qadr["button"]])
        self._steps = 0
        self._start_symbolic = sym
        self._update_light_visuals()
        state = self.scene_state()
        return self._observation(state), {"scene_state": state, "symbolic_state": sym}

    def step(self, action):
        a = np.asarray(action, dtype=np.float64)
        if a.shape != self.action_space.shape or not np.all(np.isfinite(a)):
            raise UserError(
                f"action must be {self.action_space.shape[0]} finite numbers for action_mode "
                f"{self.config.action_mode!r}, got shape {a.shape} with values {np.round(a, 4).tolist()}."
            )
        a = np.clip(a, self.action_space.low, self.action_space.high)
        self._gripper_action = 1.0 if a[-1] > 0 else -1.0
        q_new = self._joint_targets(a)

        m, d = self._model, self._data
        q_old = self._q_cmd
        d.ctrl[self._grip_act] = panda.FINGER_TRAVEL if self._gripper_action > 0 else 0.0
        button = self._qadr["button"]
        # A position servo with damping kv pulls towards zero velocity; adding (kv/kp) * the
        # setpoint velocity to the setpoint turns that into kv * (qd_ref - qd): no ramp lag.
        feedforward = self._kv_over_kp * (q_new - q_old) * CONTROL_HZ
        lo, hi = self._ik.lower, self._ik.upper
        for k in range(1, SUBSTEPS + 1):
            # Clipped so the feedforward cannot carry a joint that stops at its limit past it.
            d.ctrl[self._arm_act] = np.clip(q_old + (q_new - q_old) * (k / SUBSTEPS) + feedforward, lo, hi)
            mujoco.mj_step(m, d)
            b = d.qpos[button]
            if self._button_prev < BUTTON_MIDPOINT <= b:  # each press past the midpoint toggles the LED
                self._led ^= 1
            self._button_prev = b
        self._q_cmd = q_new
        mujoco.mj_forward(m, d)  # kinematics and contacts of the state the observation shows
        self._update_light_visuals()
        self._steps += 1
        state = self.scene_state()
        truncated = self.config.max_episode_steps is not None and self._steps >= self.config.max_episode_steps
        return self._observation(state), 0.0, False, truncated, {"scene_state": state}

    def render(self):
        if self._rig is None:
            return None
        return self._rig.render(self._data)["static"].rgb

    def close(self) -> None:
        if self._rig is not None:
            self._rig.close()
            self._rig = None

    # ------------------------------------------------------------------ internals
    def _joint_targets(self, a: np.ndarray) -> np.ndarray:
        mode = self.config.action_mode
        if mode == "joint":
            q = np.clip(a[:7], self._ik.lower, self._ik.upper)
            step = panda.VELOCITY_LIMIT / CONTROL_HZ
            q = self._q_cmd + np.clip(q - self._q_cmd, -step, step)
            self._target_pos, self._target_rot = self._ik.forward(q)
            return q
        if mode == "rel_cartesian":
            pos = self._target_pos + a[:3] * REL_POS_SCALE
            euler = ik.mat_to_euler(self._target_rot) + a[3:6] * REL_ROT_SCALE
            rot = ik.euler_to_mat(euler)
            # Anti-windup: the target may lead the actual tool only a little.
            tcp = self._data.site_xpos[self._tcp_site]
            lead = pos - tcp
            dist = np.linalg.norm(lead)
            if dist > MAX_TARGET_LEAD:
                pos = tcp + lead * (MAX_TARGET_LEAD / dist)
            tcp_rot = self._data.site_xmat[self._tcp_site].reshape(3, 3)
            turn = ik.rotation_error(rot, tcp_rot)
            angle = np.linalg.norm(turn)
            if angle > MAX_TARGET_TURN:
                rot = _axis_angle_mat(turn * (MAX_TARGET_TURN / angle)) @ tcp_rot
        else:
            pos = a[:3].copy()
            rot = ik.euler_to_mat(a[3:6])
        lo = np.array([r[0] for r in WORKSPACE])
        hi = np.array([r[1] for r in WORKSPACE])
        self._target_pos = np.clip(pos, lo, hi)
        self._target_rot = rot
        return self._ik.solve(self._q_cmd, self._target_pos, self._target_rot)

    def _observation(self, state: SceneState) -> dict:
        obs = {
            "observation.state": self.robot_obs().astype(np.float32),
            "observation.environment_state": state.scene_obs().astype(np.float32),
        }
        if self.config.cameras:
            images = self._rig.render(self._data)
            for cam in ("static", "gripper"):
                obs[f"observation.images.{cam}"] = images[cam].rgb
            if self.config.depth:
                for cam in ("static", "gripper"):
                    obs[f"observation.depth.{cam}"] = images[cam].depth
            if self.config.segmentation:
                for cam in ("static", "gripper"):
                    obs[f"observation.segmentation.{cam}"] = images[cam].segmentation
        obs["task"] = self._instruction
        return obs

    def _update_light_visuals(self) -> None:
        self._model.geom_matid[self._bulb_geom] = self._mat["bulb_on" if self.lightbulb() else "bulb_off"]
        self._model.geom_matid[self._led_geom] = self._mat["led_on" if self._led else "led_off"]

    def _set_block(self, color: str, pos: np.ndarray, quat: np.ndarray) -> None:
        qa, da = self._block_qadr[color], self._block_dadr[color]
        self._data.qpos[qa : qa + 3] = pos
        self._data.qpos[qa + 3 : qa + 7] = quat
        self._data.qvel[da : da + 6] = 0.0

    def _place_blocks(self, sym: SymbolicState, rng: np.random.Generator) -> None:
        """Realise the symbolic block locations with concrete, slightly noisy poses."""
        cfg, pn, d = self.scene_config, self.config.placement_noise, self._data
        by_place: dict[str, list[str]] = {}
        for color in BLOCK_COLORS:
            by_place.setdefault(sym.blocks[color], []).append(color)
        size = {c: cfg.block_size(c) for c in BLOCK_COLORS}
        placed: dict[str, tuple[np.ndarray, float]] = {}  # colour -> (pos, yaw)

        # Table: non-overlapping positions in the table region, rejection-sampled.
        (x0, x1), (y0, y1) = scene.TABLE_REGION
        for color in by_place.get("table", []):
            radius = 0.5 * float(np.hypot(size[color][0], size[color][1]))
            for _ in range(1000):
                xy = np.array([rng.uniform(x0, x1), rng.uniform(y0, y1)])
                others = [(p, 0.5 * float(np.hypot(size[o][0], size[o][1]))) for o, (p, _) in placed.items()]
                if all(np.linalg.norm(xy - p[:2]) > radius + r + 0.02 for p, r in others):
                    break
            else:  # pragma: no cover - the region fits three blocks easily
                raise AssertionError("could not place the table blocks apart")
            yaw = rng.uniform(-math.pi / 8, math.pi / 8)
            placed[color] = (np.array([xy[0], xy[1], size[color][2] / 2]), yaw)

        # Containers: blocks side by side along x around the spot. In the drawer they lie
        # turned by 90 degrees (long side along y), so a hand with its fingers along x (the
        # way that keeps the palm clear of the desk top) can grasp each across 0.05 m; they
        # are spread over the drawer's width so the open fingers (0.03 m beside each side of a
        # block) fit between them where they can.
        drawer_spot = d.site_xpos[self._model.site("drawer_spot").id].copy()
        containers = {  # place -> (spot, usable width along x, block yaw, spread over the width)
            "slider_left": (scene.slider_spot(cfg, "left"), scene.CABINET_HALF_WIDTH - 0.04, 0.0, False),
            "slider_right": (scene.slider_spot(cfg, "right"), scene.CABINET_HALF_WIDTH - 0.04, 0.0, False),
            "drawer": (drawer_spot, 2 * scene.DRAWER_HALF[0] - 0.04, math.pi / 2, True),
        }
        for place, (spot, width, yaw0, spread) in containers.items():
            colors = by_place.get(place, [])
            if not colors:
                continue
            gap = 0.015
            extent = {c: size[c][0] if yaw0 == 0.0 else size[c][1] for c in colors}  # along x
            total = sum(extent.values()) + gap * (len(colors) - 1)
            if total > width:
                raise UserError(
                    f"symbolic state puts {colors} in {place!r}, which is {width:.2f} m wide; they need "
                    f"{total:.2f} m. Put fewer blocks there."
                )
            stagger = (0.0, 0.0)
            if spread:  # equal room between neighbours and at both ends of the usable width
                gap = (width - sum(extent.values())) / (len(colors) + 1)
                total = width - 2 * gap
                if gap < DRAWER_FINGER_ROOM:  # too little: every other block towards the robot
                    stagger = DRAWER_STAGGER
            slack = (width - total) / 2 if not spread else gap / 4
            x = spot[0] - total / 2 + rng.uniform(-min(pn, slack), min(pn, slack))
            for i, c in enumerate(colors):
                y = spot[1] + stagger[i % 2] + rng.uniform(-pn, pn)
                centre = np.array([x + extent[c] / 2, y, spot[2] + size[c][2] / 2])
                placed[c] = (centre, yaw0 + rng.uniform(-0.1, 0.1))
                x += extent[c] + gap

        for color, (pos, yaw) in placed.items():
            self._set_block(color, pos + [0, 0, 0.001], ik.euler_to_quat(np.array([0.0, 0.0, yaw])))

        # Stacked: on top of a table block that carries nothing yet.
        bases = [c for c in by_place.get("table", [])]
        for color in by_place.get("stacked", []):
            if not bases:
                raise UserError(
                    f"symbolic state stacks the {color} block but no block on the table is free to carry it; "
                    "put at least one more block on the table."
                )
            base = bases.pop(0)
            pos, yaw = placed[base]
            top = pos[2] + size[base][2] / 2
            placed[color] = (np.array([pos[0], pos[1], top + size[color][2] / 2]), yaw)
            self._set_block(
                color,
                placed[color][0] + [0, 0, 0.002],
                ik.euler_to_quat(np.array([0, 0, yaw + rng.uniform(-0.1, 0.1)])),
            )

        grasped = by_place.get("grasped", [])
        if len(grasped) > 1:
            raise UserError(f"symbolic state has {grasped} all grasped; the gripper holds at most one block.")
        if grasped:
            color = grasped[0]
            mujoco.mj_kinematics(self._model, d)
            tcp = d.site_xpos[self._tcp_site].copy()
            R = d.site_xmat[self._tcp_site].reshape(3, 3)
            # Block x across the fingers' travel direction, its 0.05 m side between the pads, z up.
            R_block = R @ np.diag([1.0, -1.0, -1.0])
            self._set_block(color, tcp, ik.mat_to_quat(R_block))
            d.qpos[self._finger_qadr] = size[color][1] / 2 + 0.0005
            self._gripper_action = -1.0
        mujoco.mj_forward(self._model, d)


def _axis_angle_mat(vec: np.ndarray) -> np.ndarray:
    angle = float(np.linalg.norm(vec))
    quat = np.array([1.0, 0.0, 0.0, 0.0])
    if angle > 0:
        mujoco.mju_axisAngle2Quat(quat, vec / angle, angle)
    return ik.quat_to_mat(quat)
