"""`policy_model.action_frame=tool` end to end: absolute targets recorded in the sim, `dreamrt train`
normalising them in the tool frame of every training window, and the checkpoint acting on live
observations with world-frame targets, in torch and in onnxruntime.

What the tool frame is worth is measured in docs/shipped_checkpoints.md; this test holds the
plumbing.
"""

import numpy as np
import pytest
import torch
from sim_demos import record_demos

from dreamrt.cli.main import main
from dreamrt.episodes import SamplerConfig
from dreamrt.policies.action_frames import to_tool_frame
from dreamrt.policies.diffusion_policy import load_diffusion_policy
from dreamrt.policies.factory import PolicyConfig, load_policy
from dreamrt.sim.env import CalvinStyleEnv, EnvConfig
from dreamrt.training.dataset import EpisodeDataset, EpisodeDatasetConfig

SHRINK = ["policy_model.preset=tiny", "policy_model.horizon=8", "policy_model.n_action_steps=4"]
QUICK = ["trainer.batch_size=8", "trainer.device=cpu", "trainer.threads=1", "trainer.progress=false"]
TOOL = ["policy_model.action_mode=abs_cartesian", "policy_model.action_frame=tool"]


@pytest.fixture(scope="module")
def target_store(tmp_path_factory):
    out = tmp_path_factory.mktemp("tool_frame")
    return record_demos(out, "lift_red_block_table", cameras=False, action_mode="abs_cartesian")


def test_tool_frame_policy_trains_on_absolute_targets_and_acts_in_the_world(target_store, tmp_path, capsys):
    run = tmp_path / "run"
    train = ["train", f"dataset.path={target_store}", "dataset.val_ratio=0"]
    assert (
        main([*train, *SHRINK, *QUICK, *TOOL, "trainer.steps=3", "trainer.save_every=3", "--out", str(run)])
        == 0
    )

    policy = load_diffusion_policy(run)
    assert (policy.config.action_mode, policy.config.action_frame) == ("abs_cartesian", "tool")
    # The action's min-max spans exactly the training windows' targets seen from their current step.
    windows = EpisodeDataset(
        EpisodeDatasetConfig(
            path=str(target_store),
            sampler=SamplerConfig(
                horizon=8,
                n_obs_steps=2,
                n_action_steps=4,
                obs_keys=["observation.state"],
                action_keys=["action"],
            ),
        )
    )
    items = [windows[i] for i in range(len(windows))]
    actions = torch.stack([torch.as_tensor(item["action"]) for item in items]).double()
    tool_pose = torch.stack([torch.as_tensor(item["observation.state"])[1, :6] for item in items]).double()
    relative = to_tool_frame(actions, tool_pose).flatten(0, 1)
    params = policy.normalizer.params("action")
    np.testing.assert_allclose(params.scale, 2.0 / (relative.max(0).values - relative.min(0).values).numpy())
    np.testing.assert_allclose(params.offset, -1.0 - relative.min(0).values.numpy() * params.scale)

    env = CalvinStyleEnv(EnvConfig(cameras=False, action_mode="abs_cartesian"))
    try:
        obs, _ = env.reset(seed=1, options={"instruction": "lift the red block from the table"})
        chunks = []
        for backend in ("torch", "onnxruntime"):
            acting = load_policy(str(run), PolicyConfig(path=str(run), threads=1, backend=backend))
            acting.reset(seed=0)
            chunks.append(acting.act(obs).actions)
        assert chunks[0].shape == (4, 7)
        np.testing.assert_allclose(chunks[0], chunks[1], atol=1e-4)
        # World-frame targets within the span of the tool's reach from where it is now.
        low = obs["observation.state"][:3] + relative.min(0).values[:3].numpy() - 1e-4
        high = obs["observation.state"][:3] + relative.max(0).values[:3].numpy() + 1e-4
        assert np.all((chunks[0][:, :3] >= low) & (chunks[0][:, :3] <= high))
        env.step(chunks[0][0])  # the env takes them as they are
    finally:
        env.close()

    # A warm start keeps the checkpoint's action scaling, so the kind of action must match.
    capsys.readouterr()
    world = [*train, *SHRINK, *QUICK, "policy_model.action_mode=abs_cartesian", f"init_from={run}"]
    assert main([*world, "trainer.steps=1", "--out", str(tmp_path / "world")]) == 2
    assert "action_frame=tool, but this run is configured with" in " ".join(capsys.readouterr().err.split())


def test_the_tool_frame_refuses_relative_actions(target_store, tmp_path, capsys):
    train = ["train", f"dataset.path={target_store}", "policy_model.action_frame=tool", "trainer.steps=1"]
    assert main([*train, *SHRINK, *QUICK, "--out", str(tmp_path / "run")]) == 2
    assert "action_frame=tool needs policy_model.action_mode=abs_cartesian" in " ".join(
        capsys.readouterr().err.split()
    )
