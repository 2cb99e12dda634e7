"""Rendering first, then importing Triton (what torch's optimizer does) must not crash the process."""

import importlib.util
import subprocess
import sys

import pytest

SCRIPT = """
from dreamrt.sim.env import CalvinStyleEnv, EnvConfig
env = CalvinStyleEnv(EnvConfig(cameras=True))
env.reset(seed=0)
env.step(env.action_space.sample())
import triton  # noqa: E402  (after the GL context: the order that used to segfault)
print("ok")
"""


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="Triton is not installed")
def test_triton_imports_after_rendering():
    done = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-2000:]
