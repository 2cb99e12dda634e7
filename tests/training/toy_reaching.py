"""A toy reaching task for policy-training tests: a point moves toward the goal its instruction names.

State p in [-1, 1]^2 (``observation.state``); the expert acts a = clip(2 (goal - p), -1, 1) and
the point moves p += 0.1 a. Every future action is a function of the current state and the
goal, so an action chunk is learnable from one observation. The goal is given by the
instruction ("go left" / "go right") or, without language, as ``observation.environment_state``.
Episodes are written with the real episode-store writer.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from dreamrt.episodes import create_store
from dreamrt.policies.encoders import ObsEncoderConfig
from dreamrt.training.ema import EMAConfig
from dreamrt.training.train_policy import DataConfig, PolicyModelConfig, TrainConfig
from dreamrt.training.trainer import TrainerConfig

GOALS = {"go left": np.array([-0.6, 0.0]), "go right": np.array([0.6, 0.0])}
GAIN, DT = 2.0, 0.1


def expert_actions(p: np.ndarray, goal: np.ndarray, n: int) -> np.ndarray:
    """The expert's next ``n`` actions from state ``p``: (n, 2)."""
    out = []
    for _ in range(n):
        a = np.clip(GAIN * (goal - p), -1.0, 1.0)
        out.append(a)
        p = p + DT * a
    return np.asarray(out, np.float32)


def make_store(
    path: Path, *, episodes: int = 24, length: int = 24, language: bool = False, seed: int = 0
) -> Path:
    rng = np.random.default_rng(seed)
    features = {
        "observation.state": {"dtype": "float32", "shape": [2]},
        "action": {"dtype": "float32", "shape": [2]},
    }
    if not language:
        features["observation.environment_state"] = {"dtype": "float32", "shape": [2]}
    with create_store(path, features, fps=30) as writer:
        for e in range(episodes):
            task = list(GOALS)[e % 2]
            goal = GOALS[task]
            p = rng.uniform(-1.0, 1.0, 2)
            for a in expert_actions(p, goal, length):
                frame = {"observation.state": p.astype(np.float32), "action": a}
                if not language:
                    frame["observation.environment_state"] = goal.astype(np.float32)
                writer.add_frame(frame, task=task)
                p = p + DT * a
            writer.end_episode()
    return path


def toy_config(store, *, language=False, p_drop=0.1, **trainer) -> TrainConfig:
    """A tiny DP-T (2 x 32, horizon 8, To 2, Ta 4) on a toy store; ``trainer`` overrides TrainerConfig fields."""
    keys = ["observation.state"] if language else ["observation.state", "observation.environment_state"]
    encoder = ObsEncoderConfig(
        lowdim_keys=keys, lowdim_dims=[2] * len(keys), use_language=language, language_dim=16
    )
    defaults = dict(
        steps=24,
        batch_size=16,
        lr=1e-2,
        warmup_steps=5,
        log_every=4,
        val_every=8,
        val_batches=2,
        save_every=12,
        device="cpu",
        threads=1,
        progress=False,
        ema=EMAConfig(max_decay=0.95),
    )
    return TrainConfig(
        dataset=DataConfig(path=str(store), val_ratio=0.1),
        policy_model=PolicyModelConfig(
            preset="tiny", horizon=8, n_obs_steps=2, n_action_steps=4, encoder=encoder, p_drop_attn=p_drop
        ),
        trainer=TrainerConfig(**{**defaults, **trainer}),
    )


def observation(p: np.ndarray, task: str, language: bool) -> dict:
    obs = {"observation.state": np.asarray(p, np.float32), "task": task}
    if not language:
        obs["observation.environment_state"] = GOALS[task].astype(np.float32)
    return obs


def closed_loop(
    act, observe=None, *, language: bool, episodes: int = 12, steps: int = 30, seed: int = 5
) -> tuple[float, float]:
    """Run ``act(obs, episode) -> (Ta, 2) actions`` in closed loop from random starts, executing
    whole chunks; ``observe(obs)`` (if given) receives the observations of the steps in between.

    Returns (mean squared error of every chunk against the expert's chunk from the same
    state, mean final distance to the goal).
    """
    rng = np.random.default_rng(seed)
    errors, finals = [], []
    for e in range(episodes):
        task = list(GOALS)[e % 2]
        goal = GOALS[task]
        p = rng.uniform(-1.0, 1.0, 2)
        t = 0
        while t < steps:
            chunk = np.asarray(act(observation(p, task, language), e), np.float64)
            errors.append(float(((chunk - expert_actions(p, goal, len(chunk))) ** 2).mean()))
            for i, a in enumerate(chunk):
                p = p + DT * np.clip(a, -1.0, 1.0)
                t += 1
                if observe is not None and i < len(chunk) - 1:
                    observe(observation(p, task, language))
        finals.append(float(np.linalg.norm(p - goal)))
    return float(np.mean(errors)), float(np.mean(finals))
