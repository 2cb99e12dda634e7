"""`policy_model=state_relative` end to end: a store recorded in the sim, `dreamrt train` with the
preset (shrunk by overrides), then the checkpoint on live observations of the sim, in torch and
in onnxruntime.

What the derived inputs are worth is measured in docs/shipped_checkpoints.md; this test holds
the plumbing: the preset's angles and relative positions reach the checkpoint, the encoder
reads the checkpoint's normaliser back to metres and radians, and the exported graph computes
the same features.
"""

import numpy as np
import pytest
import torch
from sim_demos import record_demos

from dreamrt.cli.main import main
from dreamrt.policies.diffusion_policy import load_diffusion_policy
from dreamrt.policies.factory import PolicyConfig, load_policy
from dreamrt.sim.env import CalvinStyleEnv, EnvConfig

SHRINK = ["policy_model.preset=tiny", "policy_model.horizon=8", "policy_model.n_action_steps=4"]
QUICK = ["trainer.batch_size=8", "trainer.device=cpu", "trainer.threads=1", "trainer.progress=false"]
BLOCKS = (6, 12, 18)  # where each block's xyz starts in observation.environment_state


@pytest.fixture(scope="module")
def state_store(tmp_path_factory):
    return record_demos(tmp_path_factory.mktemp("state_relative"), "lift_red_block_table", cameras=False)


def test_state_relative_trains_and_reads_blocks_relative_to_the_gripper(state_store, tmp_path):
    run = tmp_path / "run"
    train = ["train", f"dataset.path={state_store}", "dataset.val_ratio=0", "policy_model=state_relative"]
    assert main([*train, *SHRINK, *QUICK, "trainer.steps=3", "trainer.save_every=3", "--out", str(run)]) == 0

    policy = load_diffusion_policy(run)
    encoder = policy.config.encoder
    assert encoder.lowdim_angles == [[3, 4, 5], [9, 10, 11, 15, 16, 17, 21, 22, 23]]
    assert len(encoder.lowdim_relative) == 4
    # 15 + 24 inputs, 12 angles as (sin, cos), 3 relative positions, the instruction projection.
    assert encoder.obs_feature_dim == 15 + 24 + 12 + 9 + encoder.language_dim

    env = CalvinStyleEnv(EnvConfig(cameras=False))
    try:
        obs, _ = env.reset(seed=1, options={"instruction": "lift the red block from the table"})
        frames = [obs, env.step(np.zeros(7, np.float32))[0]]
    finally:
        env.close()
    window = {
        k: torch.from_numpy(np.stack([f[k] for f in frames])[None])
        for k in ("observation.state", "observation.environment_state")
    }
    window["task"] = [obs["task"]]
    features = policy.encode_observations(window)[0]  # (To, O)
    tcp = window["observation.state"][0, :, :3]
    scene = window["observation.environment_state"][0]
    # observation.state: 12 kept dims, 3 sines, 3 cosines; environment_state: 15 kept, 9 and 9.
    relative = features[:, 51:60]
    expected = torch.cat([(scene[:, i : i + 3] - tcp) * 10.0 for i in BLOCKS], dim=-1)
    torch.testing.assert_close(relative, expected, atol=1e-4, rtol=0)
    roll = window["observation.state"][0, :, 3]
    torch.testing.assert_close(features[:, 12], torch.sin(roll), atol=1e-5, rtol=0)  # the first sine

    chunks = []
    for backend in ("torch", "onnxruntime"):
        acting = load_policy(str(run), PolicyConfig(path=str(run), threads=1, backend=backend))
        acting.reset(seed=0)
        chunks.append(acting.act(frames[0]).actions)
    assert chunks[0].shape == (4, 7)
    np.testing.assert_allclose(chunks[0], chunks[1], atol=1e-4)
