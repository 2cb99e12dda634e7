"""Synthetic episodes for world-model development: a square that moves with the action.

Until the simulator's demonstration stores exist, this gives data whose dynamics are known:
frame t+1 is frame t with the square moved by ``speed * action[:2]`` pixels (clipped to the
image). Actions are held for a few steps at a time, like a policy's. Colours change per
episode, so a tokenizer cannot memorise one picture. ``observation.state`` carries the
square's position (x, y in [-1, 1]) in its first two entries; the rest of the 7-d action and
15-d state are noise the model must learn to ignore.

:func:`write_moving_square_store` writes such episodes into a dreamrt episode store with the
keys the CALVIN-style recorder uses (``observation.images.static``, ``action``,
``observation.state``). numpy only.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

from dreamrt.errors import UserError


@dataclass
class MovingSquareConfig:
    image_size: int = 64
    square: int = 12  # side in pixels
    speed: float = 4.0  # pixels per step at |action| = 1
    hold: int = 4  # steps an action is held
    discrete: bool = False  # actions in {-1, 0, 1} (exact integer moves when speed is an integer)
    action_dim: int = 7
    state_dim: int = 15

    def __post_init__(self) -> None:
        if not 1 <= self.square < self.image_size:
            raise UserError(
                f"MovingSquareConfig.square must be in [1, image_size), got {self.square} (image {self.image_size})."
            )
        if self.action_dim < 2 or self.state_dim < 2 or self.hold < 1:
            raise UserError(
                f"MovingSquareConfig needs action_dim >= 2, state_dim >= 2 and hold >= 1, got {self.action_dim}, "
                f"{self.state_dim}, {self.hold}."
            )


def moving_square_episode(
    length: int, cfg: MovingSquareConfig, rng: np.random.Generator
) -> dict[str, np.ndarray]:
    """One episode: ``frames`` (T, S, S, 3) uint8, ``actions`` (T, A) and ``states`` (T, S_dim) float32.

    Row t of actions is the action taken at frame t; frame t+1 shows its effect."""
    s, q = cfg.image_size, cfg.square
    background = rng.integers(0, 256, size=3)
    color = (background + rng.integers(96, 160, size=3)) % 256  # always far from the background
    pos = rng.uniform(0, s - q, size=2)  # top-left corner (x, y)
    frames = np.empty((length, s, s, 3), np.uint8)
    actions = rng.uniform(-1, 1, size=(length, cfg.action_dim)).astype(np.float32)
    states = rng.uniform(-1, 1, size=(length, cfg.state_dim)).astype(np.float32)
    for t in range(length):
        if t % cfg.hold == 0:
            move = rng.integers(-1, 2, size=2).astype(np.float32) if cfg.discrete else rng.uniform(-1, 1, 2)
        actions[t, :2] = move
        x, y = np.round(pos).astype(int)
        frames[t] = background
        frames[t, y : y + q, x : x + q] = color
        states[t, :2] = pos / (s - q) * 2 - 1
        pos = np.clip(pos + cfg.speed * actions[t, :2], 0, s - q)
    return {"frames": frames, "actions": actions, "states": states}


def write_moving_square_store(
    path: str | os.PathLike,
    episodes: int,
    length: int,
    cfg: MovingSquareConfig | None = None,
    *,
    seed: int = 0,
    camera: str = "observation.images.static",
    overwrite: bool = False,
) -> None:
    """Write ``episodes`` moving-square episodes of ``length`` frames into a new episode store."""
    from dreamrt.episodes import create_store

    cfg = cfg or MovingSquareConfig()
    rng = np.random.default_rng(seed)
    features = {
        camera: {
            "dtype": "uint8",
            "shape": [cfg.image_size, cfg.image_size, 3],
            "names": ["height", "width", "channel"],
        },
        "action": {"dtype": "float32", "shape": [cfg.action_dim]},
        "observation.state": {"dtype": "float32", "shape": [cfg.state_dim]},
    }
    with create_store(path, features, fps=30.0, robot_type="moving_square", overwrite=overwrite) as writer:
        for _ in range(episodes):
            ep = moving_square_episode(length, cfg, rng)
            for t in range(length):
                writer.add_frame(
                    {
                        camera: ep["frames"][t],
                        "action": ep["actions"][t],
                        "observation.state": ep["states"][t],
                    },
                    task="move the square",
                )
            writer.end_episode()
