"""Fixtures shared by the runtime's tests."""

import pytest
import torch


@pytest.fixture(autouse=True)
def restore_threads():
    """Jobs set torch's thread count for their run; give the next test the count it had."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny_state_checkpoint(tmp_path_factory):
    """A random tiny DP-T checkpoint on the env's state inputs (To 2, 4 actions per chunk, DDIM-3)."""
    from test_onnx_backend import make_policy

    from dreamrt.policies.diffusion_policy import save_diffusion_policy
    from dreamrt.policies.schedulers import SamplerConfig

    policy = make_policy(language=False, sampler=SamplerConfig(name="ddim", num_steps=3), p_drop=0.0)
    return save_diffusion_policy(policy, tmp_path_factory.mktemp("tiny_state") / "ckpt")
