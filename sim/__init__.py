"""CALVIN-style simulation: the MuJoCo scene, the gymnasium environment, tasks and protocol.

Importing this package registers ``dreamrt/CalvinStyle-v0`` with gymnasium through an entry
point string, so MuJoCo and the environment module load only when an environment is made:
``gymnasium.make("dreamrt/CalvinStyle-v0", scene="A")`` builds
:class:`dreamrt.sim.env.CalvinStyleEnv` with :class:`dreamrt.sim.env.EnvConfig` options
(``gymnasium.make("dreamrt.sim:dreamrt/CalvinStyle-v0")`` works without importing first).
The registration is the one thing done at import time: gymnasium offers no other hook, and
it costs nothing beyond numpy, which the package's data types need anyway.
"""

import os as _os
import sys as _sys

import gymnasium as _gymnasium

# MuJoCo binds its GL platform when it is first imported, and a context made later by another
# platform (the EGL fallback in render.py) fails once frames are rendered from a worker thread,
# as the real-time loop does. Headless EGL is the right default on Linux; an explicit
# MUJOCO_GL (glfw for a desktop viewer, osmesa) still wins.
if _sys.platform.startswith("linux"):
    _os.environ.setdefault("MUJOCO_GL", "egl")

ENV_ID = "dreamrt/CalvinStyle-v0"

if ENV_ID not in _gymnasium.registry:
    _gymnasium.register(id=ENV_ID, entry_point="dreamrt.sim.env:CalvinStyleEnv")
