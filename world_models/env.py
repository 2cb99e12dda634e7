"""``WorldModelEnv``: a gymnasium environment whose frames come from the world model ("the dream").

    env = WorldModelEnv.from_checkpoints("runs/wm/tokenizer", "runs/wm/dynamics", store="demos.zarr")
    obs, info = env.reset(seed=0)            # context: real frames of a recorded episode
    obs, reward, terminated, truncated, info = env.step(action)   # the generated next frame

``reset`` picks an episode of the store (``options={"episode": e, "start": t}`` to choose;
otherwise drawn from the seed), encodes its frames ``start .. start + context - 1`` and
prefills the model's KV cache with them and their recorded actions; the observation is the
last of those real frames. ``step(action)`` takes a raw action (the store's units, e.g. the
CALVIN-style env's 7-d relative action in [-1, 1]), normalises it like the training data,
generates the next latent frame with the cached sampler and decodes it, by default relative to
the last real frame (``decode="relative"``: that frame plus the change the model predicts, see
:meth:`~dreamrt.world_models.tokenizer.Tokenizer.detail`; ``"plain"`` decodes the latent alone).

Observations: ``{camera: uint8 (S, S, 3)}`` at the tokenizer's resolution (e.g.
``observation.images.static`` at 64x64), so an image policy trained at that size runs in the
dream. A model conditioned on states (``state_dim > 0``) needs the state of every frame it
generates: with a ``state_predictor`` (``dreamrt train world-model stage=state``; ``state_model=``
in ``from_checkpoints``) the env steps the state under each action and reports the prediction as
``observation.state`` (in the store's units; ``info["state_predicted"]``), so a policy that reads
the robot state runs in the dream too. ``hold_state=True`` instead keeps feeding the last real
state and reports it (an approximation, said in ``info["state_held"]``). Actions-only models
(trained with ``state_key=""``) need neither. Rewards are 0 and episodes never terminate; they
truncate after ``max_episode_steps``.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

import gymnasium as gym
import numpy as np
import torch
from gymnasium import spaces

from dreamrt.errors import UserError, choose, did_you_mean, reject_unknown_options
from dreamrt.world_models.sampling import FrameSamplerConfig, Rollout
from dreamrt.world_models.tokenizer import images_to_tensor, tensor_to_images

OPTION_KEYS = ("episode", "start")


class WorldModelEnv(gym.Env):
    """See the module docstring."""

    metadata = {"render_modes": ["rgb_array"], "render_fps": 30}

    def __init__(
        self,
        tokenizer: Any,
        model: Any,
        normalizer: dict[str, Any],
        store: str,
        *,
        camera: str = "observation.images.static",
        action_key: str = "action",
        state_key: str = "",
        sampler: FrameSamplerConfig | None = None,
        context: int = 0,
        max_episode_steps: int | None = 200,
        hold_state: bool = False,
        state_predictor: Any = None,
        decode: str = "relative",
        render_mode: str | None = None,
    ):
        from dreamrt.episodes import Normalizer, open_store

        self.tokenizer, self.model = tokenizer.eval(), model.eval()
        c = model.config
        if (
            c.latent_channels != tokenizer.config.latent_channels
            or c.latent_size != tokenizer.config.latent_size
        ):
            raise UserError(
                f"The dynamics model works on {c.latent_channels}x{c.latent_size}x{c.latent_size} latents, the "
                f"tokenizer makes {tokenizer.config.latent_channels}x{tokenizer.config.latent_size}x"
                f"{tokenizer.config.latent_size}: they were not trained together."
            )
        if c.state_dim and not state_key:
            raise UserError(
                f"This world model is conditioned on the robot state (state_dim={c.state_dim}): pass state_key (e.g. "
                f"'observation.state') and a state_predictor, or hold_state=True, or use an actions-only model."
            )
        if c.state_dim and (state_predictor is None) == (not hold_state):
            raise UserError(
                f"This world model is conditioned on the robot state (state_dim={c.state_dim}) and does not predict "
                f"it. Pass a state_predictor (`dreamrt train world-model stage=state`) to step it under the actions, "
                f"or hold_state=True to keep feeding the last real state; not both. Or train an actions-only model "
                f"(state_key='')."
            )
        if render_mode not in (None, "rgb_array"):
            raise UserError(f"render_mode={render_mode!r} is not supported; use None or 'rgb_array'.")
        self.render_mode = render_mode
        self.decode = choose("WorldModelEnv decode", decode, ("relative", "plain"))
        self.store = open_store(store)
        keys = [camera, action_key] + ([state_key] if c.state_dim else [])
        for key in keys:
            if key not in self.store.features:
                raise UserError(
                    f"Store '{store}' has no key '{key}'.{did_you_mean(key, self.store.keys)} "
                    f"Stored keys: {self.store.keys}."
                )
        self.camera, self.action_key = camera, action_key
        self.state_key = state_key if c.state_dim else ""
        self.normalizer = Normalizer.from_dict(normalizer)
        self.sampler = sampler or FrameSamplerConfig(steps=4, temperature=0.0)
        self.context = context or c.window - 1
        if not 1 <= self.context:
            raise UserError(f"context must be >= 1 frame, got {self.context}.")
        self.max_episode_steps = max_episode_steps
        ends = self.store.episode_ends
        lengths = np.diff(np.concatenate([[0], ends]))
        self._starts = np.concatenate([[0], ends[:-1]]).astype(np.int64)
        self._lengths = lengths.astype(np.int64)
        self._usable = np.flatnonzero(lengths >= self.context)
        if len(self._usable) == 0:
            raise UserError(
                f"No episode of '{store}' has the {self.context} frames of context the env needs."
            )

        stats = self.store.stats[action_key]
        low = np.asarray(stats["min"], np.float32).reshape(c.action_dim)
        high = np.asarray(stats["max"], np.float32).reshape(c.action_dim)
        self.action_space = spaces.Box(low, np.maximum(high, low + 1e-6), dtype=np.float32)
        size = tokenizer.config.image_size
        obs = {camera: spaces.Box(0, 255, (size, size, 3), np.uint8)}
        if self.state_key:
            obs[self.state_key] = spaces.Box(-np.inf, np.inf, (c.state_dim,), np.float32)
        self.observation_space = spaces.Dict(OrderedDict(obs))
        self._predicted = state_predictor is not None
        self._rollout = Rollout(model, self.sampler, batch_size=1, state_predictor=state_predictor)
        self._frame: np.ndarray | None = None
        self._detail: torch.Tensor | None = None  # decode="relative": the last real frame's detail
        self._state: np.ndarray | None = None
        self._steps = 0

    @classmethod
    def from_checkpoints(
        cls, tokenizer: str, dynamics: str, store: str, *, state_model: str = "", **kwargs: Any
    ) -> WorldModelEnv:
        """Load the checkpoints (run directories or checkpoints; ``state_model`` a state predictor for a
        state-conditioned model); camera / keys default to the dynamics run's (its summary.json)."""
        from dreamrt.world_models.bench import trained_keys
        from dreamrt.world_models.dynamics import load_dynamics
        from dreamrt.world_models.tokenizer import load_tokenizer

        model, normalizer = load_dynamics(dynamics)
        keys = trained_keys(dynamics)
        for key, value in keys.items():
            kwargs.setdefault(key, value)
        if not model.config.state_dim:
            kwargs["state_key"] = ""
        if state_model:
            from dreamrt.world_models.proprio import load_state_predictor_for

            kwargs["state_predictor"] = load_state_predictor_for(
                state_model, model, normalizer, kwargs["state_key"]
            )
        return cls(load_tokenizer(tokenizer), model, normalizer, store, **kwargs)

    # ------------------------------------------------------------------ gymnasium API

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        options = dict(options or {})
        reject_unknown_options("reset()", options, OPTION_KEYS)
        episode = options.get("episode")
        if episode is None:
            episode = int(self._usable[self.np_random.integers(len(self._usable))])
        elif episode not in set(self._usable.tolist()):
            raise UserError(
                f"reset option episode={episode}: expected one of the store's episodes with at least "
                f"{self.context} frames ({len(self._usable)} of {len(self._lengths)} qualify)."
            )
        last_start = int(self._lengths[episode]) - self.context
        start = options.get("start")
        if start is None:
            start = int(self.np_random.integers(last_start + 1))
        elif not 0 <= start <= last_start:
            raise UserError(f"reset option start={start}: expected 0..{last_start} in episode {episode}.")
        lo = int(self._starts[episode]) + start
        hi = lo + self.context
        frames = np.asarray(self.store.read(self.camera, lo, hi))  # (context, H, W, 3) uint8
        images = images_to_tensor(frames, self.tokenizer.config.image_size)  # (context, 3, S, S)
        actions = torch.from_numpy(
            self.normalizer.normalize(self.action_key, self.store.read(self.action_key, lo, hi))
        )
        states = None
        if self.state_key:
            raw_states = np.asarray(self.store.read(self.state_key, lo, hi), np.float32)
            states = torch.from_numpy(self.normalizer.normalize(self.state_key, raw_states)).float()[None]
            self._state = raw_states[-1]
        with torch.no_grad():
            latents = self.tokenizer.encode(images)[None]  # (1, context, C, h, w)
            self._detail = self.tokenizer.detail(images[-1:]) if self.decode == "relative" else None
        self._rollout.prefill(latents, actions.float()[None], states)
        self._frame = tensor_to_images(images[-1])
        self._steps = 0
        return self._observation(), {"episode": episode, "start": start, **self._state_info()}

    def step(self, action):
        if self._frame is None:
            raise UserError("WorldModelEnv.step() before reset(): call reset() first.")
        action = np.asarray(action, np.float32)
        if action.shape != self.action_space.shape or not np.all(np.isfinite(action)):
            raise UserError(
                f"action must be {self.action_space.shape[0]} finite numbers (the store's '{self.action_key}' "
                f"units), got shape {action.shape}."
            )
        a = torch.from_numpy(self.normalizer.normalize(self.action_key, action)).float()[None]
        s = None
        if self.state_key and not self._predicted:
            s = torch.from_numpy(self.normalizer.normalize(self.state_key, self._state)).float()[None]
        with torch.inference_mode():
            z = self._rollout.step(a, s)  # (1, C, h, w)
            self._frame = tensor_to_images(self.tokenizer.decode(z, self._detail)[0])
            if self._predicted:
                predicted = self._rollout.current_state[0].numpy()
                self._state = self.normalizer.unnormalize(self.state_key, predicted).astype(np.float32)
        self._steps += 1
        truncated = self.max_episode_steps is not None and self._steps >= self.max_episode_steps
        return self._observation(), 0.0, False, truncated, self._state_info()

    def _state_info(self) -> dict[str, bool]:
        return {
            "state_held": bool(self.state_key) and not self._predicted,
            "state_predicted": self._predicted,
        }

    def render(self):
        if self.render_mode == "rgb_array":
            return None if self._frame is None else self._frame.copy()
        return None

    def _observation(self) -> dict[str, np.ndarray]:
        obs: dict[str, np.ndarray] = OrderedDict({self.camera: self._frame.copy()})
        if self.state_key:
            obs[self.state_key] = np.asarray(self._state, np.float32).copy()
        return obs
