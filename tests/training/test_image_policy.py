"""An image policy end to end: a store recorded with cameras, `dreamrt train policy_model=image_small`,
`dreamrt distill`, then both checkpoints acting on live camera observations of the sim.

The network is shrunk from the preset by command-line overrides (tiny DP-T, two CNN stages
of width 16) so that the test is about the plumbing of two cameras of different sizes, their
crops and the robot state, not about what the policy learns in three steps.
"""

import numpy as np
import pytest
from sim_demos import record_demos

from dreamrt.cli.main import main
from dreamrt.policies.factory import PolicyConfig, load_policy
from dreamrt.sim.env import CalvinStyleEnv, EnvConfig
from dreamrt.training.checkpoint import load_checkpoint

SHRINK = [
    "policy_model.preset=tiny",
    "policy_model.horizon=8",
    "policy_model.n_action_steps=4",
    "policy_model.encoder.cnn_width=16",
    "policy_model.encoder.cnn_blocks=[1,1]",
    "policy_model.encoder.keypoints=8",
    "policy_model.encoder.image_feature_dim=16",
    "policy_model.encoder.use_language=false",
]
QUICK = ["trainer.batch_size=4", "trainer.device=cpu", "trainer.threads=1", "trainer.progress=false"]


@pytest.fixture(scope="module")
def image_store(tmp_path_factory):
    return record_demos(tmp_path_factory.mktemp("image_policy"), "turn_on_led", cameras=True)


def test_image_small_trains_distils_and_acts_on_camera_observations(image_store, tmp_path):
    teacher, student = tmp_path / "teacher", tmp_path / "student"
    common = [f"dataset.path={image_store}", "dataset.val_ratio=0"]
    train = [
        "train",
        *common,
        "policy_model=image_small",
        *SHRINK,
        *QUICK,
        "trainer.steps=3",
        "trainer.save_every=3",
    ]
    assert main([*train, "--out", str(teacher)]) == 0

    encoder = load_checkpoint(teacher).config["encoder"]
    assert encoder["lowdim_keys"] == ["observation.state"]  # the scene is seen only through the cameras
    cameras = {
        c["name"]: (c["height"], c["width"], c["crop_height"], c["crop_width"]) for c in encoder["cameras"]
    }
    assert cameras == {"static": (96, 96, 88, 88), "gripper": (64, 64, 58, 58)}

    distill = [
        "distill",
        f"teacher={teacher}",
        *common,
        "steps=2",
        "eval_windows=8",
        *QUICK,
        "trainer.eval_every=0",
    ]
    assert main([*distill, "--out", str(student)]) == 0

    env = CalvinStyleEnv(EnvConfig(cameras=True))
    try:
        obs, _ = env.reset(seed=0, options={"instruction": "turn on the led"})
        for path in (teacher, student):
            policy = load_policy(str(path), PolicyConfig(path=str(path), threads=1))
            policy.reset(seed=0)
            chunk = policy.act(obs)
            assert chunk.actions.shape == (4, 7) and np.isfinite(chunk.actions).all()
    finally:
        env.close()
