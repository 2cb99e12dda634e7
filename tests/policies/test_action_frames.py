"""Tool-frame actions: the conversion, its statistics, and a policy that predicts in the tool frame
but acts, trains and takes guidance in world-frame targets."""

import math

import numpy as np
import pytest
import torch

from dreamrt.episodes.normalize import Normalizer
from dreamrt.episodes.sampler import SamplerConfig as WindowConfig
from dreamrt.episodes.sampler import SequenceSampler, create_indices
from dreamrt.errors import UserError
from dreamrt.policies.action_frames import to_tool_frame, to_world_frame, tool_frame_stats, wrap_angle
from dreamrt.policies.diffusion_policy import DiffusionPolicy, DiffusionPolicyConfig
from dreamrt.policies.dpt import preset
from dreamrt.policies.encoders import ObsEncoderConfig
from dreamrt.policies.schedulers import SamplerConfig

TO, H, TA = 2, 8, 3
STATE_DIM, ACTION_DIM = 15, 7
TOOL_MIN = np.array([-0.2, -0.1, -0.3, -0.1, -0.2, -0.5, -1.0])
TOOL_MAX = np.array([0.2, 0.3, 0.1, 0.1, 0.2, 0.5, 1.0])


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_the_tool_frame_wraps_angles_and_converts_back():
    g = torch.Generator().manual_seed(0)
    pose = torch.cat([torch.rand(4, 3, generator=g), torch.full((4, 3), math.pi - 0.01)], dim=-1)
    actions = torch.cat(
        [
            pose[:, None, :3] + 0.05 * torch.randn(4, H, 3, generator=g),
            torch.full((4, H, 3), -math.pi + 0.02),  # 0.03 rad from the tool's angles, across the wrap
            torch.sign(torch.randn(4, H, 1, generator=g)),
        ],
        dim=-1,
    )
    tool = to_tool_frame(actions, pose)
    torch.testing.assert_close(tool[..., :3], actions[..., :3] - pose[:, None, :3])
    torch.testing.assert_close(tool[..., 3:6], torch.full((4, H, 3), 0.03), atol=1e-5, rtol=0)
    torch.testing.assert_close(tool[..., 6], actions[..., 6])  # the gripper is left alone
    back = to_world_frame(tool, pose)
    torch.testing.assert_close(back[..., :3], actions[..., :3], atol=1e-6, rtol=0)
    torch.testing.assert_close(back[..., 3:6], wrap_angle(actions[..., 3:6]), atol=1e-5, rtol=0)


def test_tool_frame_stats_cover_every_window_the_sampler_draws():
    rng = np.random.default_rng(0)
    ends = np.array([5, 12, 15])
    actions = rng.normal(size=(15, ACTION_DIM))
    states = rng.normal(size=(15, 4 + 6))
    states[:, 3:6] = rng.uniform(-math.pi, math.pi, size=(15, 3))
    horizon, current = 4, 1
    windows = create_indices(ends, horizon, pad_before=1, pad_after=2)
    stats = tool_frame_stats(actions, states, windows, horizon, current)

    # Brute force: every window as the sampler reads it, edge frames repeated.
    sampler = SequenceSampler(
        {"observation.state": states, "action": actions},
        ends,
        WindowConfig(horizon=horizon, n_obs_steps=2, n_action_steps=3, obs_keys=["observation.state"]),
    )
    rows = []
    for i in range(len(sampler)):
        w = sampler.sample(i)
        a = w["action"].copy()
        a[:, :3] -= w["observation.state"][current, :3]
        a[:, 3:6] = (a[:, 3:6] - w["observation.state"][current, 3:6] + np.pi) % (2 * np.pi) - np.pi
        rows.append(a)
    rows = np.concatenate(rows)
    np.testing.assert_allclose(stats["min"], rows.min(0))
    np.testing.assert_allclose(stats["max"], rows.max(0))
    np.testing.assert_allclose(stats["mean"], rows.mean(0))
    np.testing.assert_allclose(stats["std"], rows.std(0), atol=1e-9)
    with pytest.raises(UserError, match="one row per frame"):
        tool_frame_stats(actions, states[:-1], windows, horizon, current)
    with pytest.raises(UserError, match="at least 6"):
        tool_frame_stats(actions[:, :3], states, windows, horizon, current)


def make_policy(sampler: SamplerConfig | None = None) -> DiffusionPolicy:
    enc = ObsEncoderConfig(lowdim_keys=["observation.state"], lowdim_dims=[STATE_DIM], use_language=False)
    cfg = DiffusionPolicyConfig(
        encoder=enc,
        model=preset("tiny", action_dim=ACTION_DIM, obs_dim=enc.obs_feature_dim, horizon=H, n_obs_steps=TO),
        sampler=sampler or SamplerConfig(name="ddim", num_steps=5),
        n_action_steps=TA,
        action_mode="abs_cartesian",
        action_frame="tool",
    )
    stats = {
        "observation.state": {"min": [-1.0] * STATE_DIM, "max": [1.0] * STATE_DIM},
        "action": {"min": TOOL_MIN.tolist(), "max": TOOL_MAX.tolist()},
    }
    normalizer = Normalizer.from_stats(stats, {"observation.state": "min_max", "action": "min_max"})
    torch.manual_seed(0)
    return DiffusionPolicy(cfg, normalizer).eval()


def state(i: int) -> np.ndarray:
    s = np.linspace(-0.5, 0.5, STATE_DIM).astype(np.float32) + 0.01 * i
    s[3:6] = [math.pi - 0.05, 0.02, -0.4 + 0.01 * i]
    return s


class MidpointSampler:
    """x0 = 0 everywhere: the middle of every normalised action range."""

    def sample(self, denoise, x_T, generator=None):
        return torch.zeros_like(x_T)


def test_a_tool_frame_policy_acts_in_world_targets_around_the_current_tool_pose():
    policy = make_policy()
    policy.sampler = MidpointSampler()
    policy.reset(0)
    policy.observe({"observation.state": state(0)})
    chunk = policy.act({"observation.state": state(1)}).actions  # (TA, 7)
    middle = (TOOL_MIN + TOOL_MAX) / 2
    tool = state(1)  # the current step anchors the targets, not the one before it
    np.testing.assert_allclose(chunk[:, :3], np.broadcast_to(tool[:3] + middle[:3], (TA, 3)), atol=1e-6)
    angles = (tool[3:6] + middle[3:6] + np.pi) % (2 * np.pi) - np.pi
    np.testing.assert_allclose(chunk[:, 3:6], np.broadcast_to(angles, (TA, 3)), atol=1e-5)
    np.testing.assert_allclose(chunk[:, 6], middle[6], atol=1e-6)


def test_training_normalises_world_targets_in_the_tool_frame():
    policy = make_policy()
    tool = torch.from_numpy(np.stack([state(0), state(1)]))[None]  # (1, To, 15)
    # Targets exactly at the current tool pose (the angles one turn away) with the gripper open.
    at_tool = torch.cat([tool[0, 1, :6] + torch.tensor([0, 0, 0, 2 * math.pi, 0, 0]), torch.ones(1)])
    batch = {"observation.state": tool, "action": at_tool.expand(1, H, ACTION_DIM)}
    zero_offset = torch.from_numpy(-1.0 + 2.0 * (0.0 - TOOL_MIN) / (TOOL_MAX - TOOL_MIN)).float()
    zero_offset[6] = 1.0
    torch.testing.assert_close(
        policy.normalized_actions(batch)[0], zero_offset.expand(H, -1), atol=1e-5, rtol=0
    )
    loss = policy.compute_loss(batch, generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(loss)


def test_guidance_takes_world_targets_for_a_tool_frame_policy():
    policy = make_policy()
    policy.reset(3)
    policy.observe({"observation.state": state(0)})
    current = {"observation.state": state(1)}
    free = policy.act(current).actions
    target = np.concatenate([state(1)[:3] + [0.15, 0.2, -0.2], state(1)[3:6], [-0.9]]).astype(np.float32)
    prefix = np.repeat(target[None], TA, axis=0)
    policy.reset(3)
    policy.observe({"observation.state": state(0)})
    guided = policy.act_guided(current, prefix, np.array([1.0, 1.0, 0.0], np.float32)).actions
    far = np.abs(free[:2, :3] - prefix[:2, :3]).mean()
    near = np.abs(guided[:2, :3] - prefix[:2, :3]).mean()
    assert near < 0.5 * far, (near, far)


def test_the_tool_frame_needs_absolute_targets_and_the_tool_pose():
    enc = ObsEncoderConfig(lowdim_keys=["observation.state"], lowdim_dims=[STATE_DIM], use_language=False)
    model = preset("tiny", action_dim=ACTION_DIM, obs_dim=enc.obs_feature_dim, horizon=H, n_obs_steps=TO)
    with pytest.raises(UserError, match="abs_cartesian"):
        DiffusionPolicyConfig(encoder=enc, model=model, n_action_steps=TA, action_frame="tool")  # deltas
    other = ObsEncoderConfig(
        lowdim_keys=["observation.environment_state"], lowdim_dims=[24], use_language=False
    )
    with pytest.raises(UserError, match="observation.state"):
        DiffusionPolicyConfig(
            encoder=other,
            model=preset(
                "tiny", action_dim=ACTION_DIM, obs_dim=other.obs_feature_dim, horizon=H, n_obs_steps=TO
            ),
            n_action_steps=TA,
            action_mode="abs_cartesian",
            action_frame="tool",
        )
    with pytest.raises(UserError, match="world"):
        DiffusionPolicyConfig(encoder=enc, model=model, n_action_steps=TA, action_frame="gripper")
