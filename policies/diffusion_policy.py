"""DP-T as a dreamrt Policy: observation encoder + transformer denoiser + noise schedule + sampler.

Training (Chi et al., RSS 2023): normalise the window's low-dim observations and actions
with the store's statistics (min-max to [-1, 1]), encode the To observation steps into
one feature vector each, noise the H normalised actions at a uniform random timestep and
regress the noise (epsilon prediction, MSE):

    loss = mse(DPT(add_noise(a, eps, t), t, encoder(obs)), eps)      a: (B, H, A), obs: (B, To, ...)

Acting: ``act(observation)`` appends the current observation to a history of To steps (the
first observation after ``reset`` is repeated To times), samples an action sequence of H
steps from N(0, I) with the policy's ``sampler``, unnormalises it, and returns the
executable part ``prediction[To-1 : To-1+Ta]`` (the step of the current observation and
the Ta - 1 after it), as Diffusion Policy does. The history must hold consecutive control
steps as in training, so a caller executing a chunk passes the observations of the steps in
between to ``observe(observation)``; without them the history would span Ta steps instead of
one (``PolicySpec.n_obs_steps > 1`` tells a caller that it matters).

Sampler plug point. ``policy.sampler`` is any object with
``sample(denoise, x_T, generator=...) -> x0`` where ``denoise(x_t, t) -> model output``
(:class:`dreamrt.policies.schedulers.Sampler` and its DDPM / DDIM builders). Build it from
a :class:`SamplerConfig` with :meth:`DiffusionPolicy.set_sampler` or assign another object
(a distilled few-step sampler) directly; training never touches it.

Language. With ``encoder.use_language`` the policy keeps the embedding of every training
instruction in the buffer ``instruction_embeddings`` (rows in the order of
``config.instructions``, i.e. the store's ``task_index``), so checkpoints answer their own
instructions without loading the sentence model. Training batches carry ``task_index``
(B, To); ``act`` reads ``observation["task"]`` and loads the frozen MiniLM only for an
instruction it has never seen.

Checkpoints (kind ``dpt_policy``): ``config.yaml`` is :class:`DiffusionPolicyConfig`,
``model.safetensors`` the (EMA) weights, ``normalizer.json`` the store's normaliser. See
:func:`save_diffusion_policy` / :func:`load_diffusion_policy`.

Dimensions: B batch, To observation steps, H horizon (action tokens), Ta executed actions,
A action dim, O per-step observation features.
"""

from __future__ import annotations

import logging
import math
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dreamrt.episodes.normalize import Normalizer
from dreamrt.errors import UserError, did_you_mean
from dreamrt.policies.dpt import DPT, DPTConfig
from dreamrt.policies.encoders import TASK_EMBEDDING_KEY, TASK_KEY, ObsEncoderConfig, ObservationEncoder
from dreamrt.policies.grounding import GROUNDING_MODES, Grounding, InstructionGrounder
from dreamrt.policies.language import EMBED_DIM, SentenceEncoder, normalize_instruction
from dreamrt.policies.protocol import ActionChunk, Observation, PolicySpec
from dreamrt.policies.schedulers import NoiseSchedule, NoiseScheduleConfig, SamplerConfig, make_sampler

POLICY_KIND = "dpt_policy"  # meta.json kind of DiffusionPolicy checkpoints
# Below this, a grounded instruction is logged as a warning, not refused: the 34 held-out CALVIN
# instructions are read with 0.25-0.95 by the shipped teacher (28 of them above 0.5), off-task
# requests ("make me a coffee", "close the door") with 0.07-0.38, so no threshold separates them.
LOW_GROUNDING_CONFIDENCE = 0.5
log = logging.getLogger(__name__)
TASK_INDEX_KEY = "task_index"  # the store column the dataset windows carry for language policies
ACTION_MODES = (
    "rel_cartesian",
    "abs_cartesian",
    "joint",
)  # as dreamrt.sim.env (not imported: no mujoco here)


# ---------------------------------------------------------------------------- config


@dataclass
class DiffusionPolicyConfig:
    """Everything needed to rebuild a DiffusionPolicy; a checkpoint's config.yaml."""

    encoder: ObsEncoderConfig
    model: DPTConfig  # obs_dim == encoder.obs_feature_dim; horizon H and n_obs_steps To live here
    noise: NoiseScheduleConfig = field(default_factory=NoiseScheduleConfig)
    sampler: SamplerConfig = field(default_factory=SamplerConfig)  # the inference sampler
    n_action_steps: int = 8  # Ta: actions returned per act()
    action_key: str = "action"
    rate_hz: float = 30.0
    action_mode: str = "rel_cartesian"
    instructions: list[str] = field(default_factory=list)  # rows of instruction_embeddings (language only)
    language_fingerprint: str = ""  # sentence-model weights that embedded them
    # The task each instruction row names (paraphrases of one task share a label), from the
    # training store's task column; empty when the store had none. Grounding needs it.
    instruction_tasks: list[int] = field(default_factory=list)
    # How an instruction outside the table is read (dreamrt.policies.grounding): "none" embeds
    # it and acts on that embedding; "task" classifies it into one of the table's tasks and acts
    # on that task's nearest paraphrase.
    instruction_grounding: str = "none"
    # Instruction embeddings are L2-normalised (per-dimension RMS 1/sqrt(384), ~20x smaller than
    # the [-1, 1] low-dim inputs); the policy scales them to unit RMS before the encoder, as it
    # normalises every other input. Without it the language signal reaches DP-T so weakly that a
    # two-instruction toy task is not learned in 400 steps (with it: the same as the state-only task).
    instruction_scale: float = math.sqrt(EMBED_DIM)

    def __post_init__(self) -> None:
        if isinstance(self.encoder, Mapping) or isinstance(self.model, Mapping):
            raise UserError(
                "DiffusionPolicyConfig takes config objects; build it from a mapping with "
                "dreamrt.training.checkpoint.config_from_dict(DiffusionPolicyConfig, data)."
            )
        if self.model.obs_dim != self.encoder.obs_feature_dim:
            raise UserError(
                f"The DP-T obs_dim ({self.model.obs_dim}) must equal the observation encoder's feature width "
                f"({self.encoder.obs_feature_dim}). Build the DPTConfig with obs_dim=encoder.obs_feature_dim."
            )
        to, h = self.model.n_obs_steps, self.model.horizon
        if not isinstance(self.n_action_steps, int) or not 1 <= self.n_action_steps <= h - to + 1:
            raise UserError(
                f"n_action_steps (Ta) must be an int in 1..horizon - n_obs_steps + 1 = {h - to + 1} (the executed "
                f"actions are prediction[To-1 : To-1+Ta]), got {self.n_action_steps!r} with horizon={h}, "
                f"n_obs_steps={to}. Lower n_action_steps or raise the horizon."
            )
        if not self.action_key:
            raise UserError(
                "DiffusionPolicyConfig.action_key is empty; name the action feature, e.g. 'action'."
            )
        if not self.instruction_scale > 0:
            raise UserError(
                f"DiffusionPolicyConfig.instruction_scale must be > 0, got {self.instruction_scale!r}."
            )
        if not self.rate_hz > 0:
            raise UserError(f"DiffusionPolicyConfig.rate_hz must be > 0, got {self.rate_hz!r}.")
        if self.action_mode not in ACTION_MODES:
            raise UserError(
                f"Unknown action_mode '{self.action_mode}'.{did_you_mean(self.action_mode, ACTION_MODES)} "
                f"Valid: {', '.join(ACTION_MODES)}."
            )
        self.instructions = [normalize_instruction(t) for t in self.instructions]
        self.instruction_tasks = [int(t) for t in self.instruction_tasks]
        if self.instruction_tasks and len(self.instruction_tasks) != len(self.instructions):
            raise UserError(
                f"DiffusionPolicyConfig.instruction_tasks has {len(self.instruction_tasks)} labels for "
                f"{len(self.instructions)} instructions; give one per instruction, or none."
            )
        if self.instruction_grounding not in GROUNDING_MODES:
            raise UserError(
                f"Unknown instruction_grounding '{self.instruction_grounding}'."
                f"{did_you_mean(self.instruction_grounding, GROUNDING_MODES)} Valid: {', '.join(GROUNDING_MODES)}."
            )
        if self.instruction_grounding == "task" and not self.instruction_tasks:
            raise UserError(
                "instruction_grounding='task' reads an instruction as one of the policy's tasks, but this policy "
                "has no instruction_tasks (the task of each instruction row). Label them with `dreamrt label-tasks "
                "checkpoint=CKPT dataset=STORE` (the store it was trained on), or use instruction_grounding=none."
            )
        if self.instructions and not self.encoder.use_language:
            raise UserError(
                f"DiffusionPolicyConfig lists {len(self.instructions)} instructions but encoder.use_language is "
                "False. Turn language on or drop the instructions."
            )

    @property
    def n_obs_steps(self) -> int:
        return self.model.n_obs_steps

    @property
    def horizon(self) -> int:
        return self.model.horizon

    @property
    def action_dim(self) -> int:
        return self.model.action_dim

    @property
    def lowdim_keys(self) -> list[str]:
        return list(self.encoder.lowdim_keys)

    @property
    def image_keys(self) -> list[str]:
        return [c.key for c in self.encoder.cameras]


# ---------------------------------------------------------------------------- helpers


class _Affine(nn.Module):
    """y = x * scale + offset over the last axes; buffers not saved (normalizer.json is the source)."""

    def __init__(self, scale: np.ndarray, offset: np.ndarray):
        super().__init__()
        self.register_buffer("scale", torch.as_tensor(scale, dtype=torch.float32), persistent=False)
        self.register_buffer("offset", torch.as_tensor(offset, dtype=torch.float32), persistent=False)

    def normalize(self, x: Tensor) -> Tensor:
        return x * self.scale + self.offset

    def unnormalize(self, y: Tensor) -> Tensor:
        return (y - self.offset) / self.scale


def _module_key(key: str) -> str:
    return key.replace(".", "__")  # ModuleDict names cannot hold dots


# ---------------------------------------------------------------------------- policy


class DiffusionPolicy(nn.Module):
    """Diffusion Policy with the DP-T denoiser; implements :class:`dreamrt.policies.protocol.Policy`.

    ``forward(batch)`` is ``compute_loss(batch)`` so that DistributedDataParallel can wrap
    the policy. ``normalizer`` must know every low-dim observation key and the action key.
    """

    def __init__(
        self,
        config: DiffusionPolicyConfig,
        normalizer: Normalizer,
        *,
        instruction_embeddings: Tensor | None = None,
        sentence_encoder: SentenceEncoder | None = None,
    ):
        super().__init__()
        self.config = config
        self.normalizer = normalizer
        self.encoder = ObservationEncoder(config.encoder, sentence_encoder)
        self.model = DPT(config.model)
        self.schedule = NoiseSchedule(config.noise)
        self._sampler = make_sampler(self.schedule, config.sampler)
        self.sampler_config: SamplerConfig | None = config.sampler  # None once a custom sampler is assigned
        self._task_scales = self._task_noise_scales(config.sampler)
        keys = [*config.lowdim_keys, config.action_key]
        missing = [k for k in keys if k not in normalizer.keys]
        if missing:
            raise UserError(
                f"The normaliser has no statistics for {missing} (it has {normalizer.keys}). Build it from the "
                "episode store the policy trains on, with these keys."
            )
        self.norms = nn.ModuleDict(
            {_module_key(k): _Affine(normalizer.params(k).scale, normalizer.params(k).offset) for k in keys}
        )
        self._check_action_dim(normalizer)
        for key in config.lowdim_keys:  # derived inputs (angles, relative positions) need raw values
            self.encoder.set_lowdim_affine(key, normalizer.params(key).scale, normalizer.params(key).offset)
        if config.encoder.use_language:
            table = torch.zeros(len(config.instructions), EMBED_DIM)
            if instruction_embeddings is not None:
                if tuple(instruction_embeddings.shape) != tuple(table.shape):
                    raise UserError(
                        f"instruction_embeddings has shape {tuple(instruction_embeddings.shape)}; expected "
                        f"({len(config.instructions)}, {EMBED_DIM}), one row per config.instructions entry."
                    )
                table = instruction_embeddings.detach().to(torch.float32).clone()
            self.register_buffer("instruction_embeddings", table)  # (N, 384), saved with the weights
        self._instruction_row = {}
        for i, text in enumerate(config.instructions):
            self._instruction_row.setdefault(text, i)
        self._encoder_seeded = False
        self._grounder: InstructionGrounder | None = None
        self.groundings: dict[str, Grounding] = {}  # what each unseen instruction was read as
        self.spec = PolicySpec(
            rate_hz=config.rate_hz,
            action_dim=config.action_dim,
            horizon=config.n_action_steps,
            n_obs_steps=config.n_obs_steps,
            action_mode=config.action_mode,
        )
        self._history: deque[dict[str, np.ndarray]] = deque(maxlen=config.n_obs_steps)
        self._generator = torch.Generator().manual_seed(0)
        # Plug point for a caching denoiser (BAC, dreamrt.runtime.bac.CachedDenoiser): a callable
        # taking the observation features (B, To, O) and returning denoise(x_t, t) for one chunk.
        # None runs the plain network. Set by whoever loads the policy; policies never import runtime.
        self.denoiser_factory: Callable[[Tensor], Callable[[Tensor, int], Tensor]] | None = None
        # Training-time plug point for language augmentation (dreamrt.training.language_augment):
        # augment(table, rows) -> (B, 384) embeddings that replace the table's rows in the loss
        # while the module is in training mode. Not saved: acting and validation read the table.
        self.instruction_augment: Callable[[Tensor, Tensor], Tensor] | None = None

    def _check_action_dim(self, normalizer: Normalizer) -> None:
        shape = normalizer.params(self.config.action_key).scale.shape
        if shape not in ((), (self.config.action_dim,)):
            raise UserError(
                f"The normaliser's '{self.config.action_key}' statistics have shape {shape}, but the model predicts "
                f"{self.config.action_dim} action dimensions. Build the model with the store's action_dim."
            )

    @property
    def device(self) -> torch.device:
        return self.model.out.weight.device

    # ------------------------------------------------------------------ sampler plug point

    @property
    def sampler(self) -> Any:
        """The inference sampler: ``sample(denoise, x_T, generator=...) -> x0`` (see the module docstring)."""
        return self._sampler

    @sampler.setter
    def sampler(self, sampler: Any) -> None:
        if not callable(getattr(sampler, "sample", None)):
            raise UserError(
                f"A policy sampler needs a sample(denoise, x_T, generator=...) method; got {type(sampler).__name__}."
            )
        self._sampler = sampler
        self.sampler_config = None  # a custom object: checkpoints keep the config the policy was built with
        self._task_scales = {}  # and its temperature is the noise it is given

    def set_sampler(self, config: SamplerConfig) -> None:
        """Replace the inference sampler (e.g. DDPM-100 for evaluation, DDIM-8 for deployment)."""
        task_scales = self._task_noise_scales(config)
        self.sampler = make_sampler(self.schedule, config)
        self.sampler_config = config
        self._task_scales = task_scales

    def _task_noise_scales(self, config: SamplerConfig) -> dict[int, float]:
        """``config.task_noise_scale`` keyed by the task labels of the instruction table."""
        if not config.task_noise_scale:
            return {}
        if not self.config.instruction_tasks:
            raise UserError(
                "A temperature per task (sampler task_noise_scale) needs the task of each instruction row, and this "
                "policy has none: label them with `dreamrt label-tasks checkpoint=CKPT`, or use noise_scale alone."
            )
        # The labels are indices into the sim's task list: what `dreamrt record` writes as
        # observation.task_id and `dreamrt label-tasks` copies into the table.
        from dreamrt.sim.tasks import task_names

        names = task_names()
        unknown = [t for t in config.task_noise_scale if t not in names]
        if unknown:
            raise UserError(
                f"task_noise_scale names an unknown task '{unknown[0]}'.{did_you_mean(unknown[0], names)} "
                f"Tasks: {', '.join(names)}."
            )
        return {names.index(t): scale for t, scale in config.task_noise_scale.items()}

    def instruction_noise_scale(self, text: str) -> float:
        """The sampler's temperature for ``text``: its task's ``task_noise_scale`` when it has one
        (the task of its table row, or of the row grounding read it as), else ``noise_scale``."""
        base = self.sampler_config.noise_scale if self.sampler_config is not None else 1.0
        if not self._task_scales:
            return base
        key = normalize_instruction(text)
        row = self._instruction_row.get(key)
        if row is None and key in self.groundings:
            row = self.groundings[key].row
        if row is None:  # an unseen wording that grounding did not read: no task to go by
            return base
        return self._task_scales.get(self.config.instruction_tasks[row], base)

    # ------------------------------------------------------------------ training

    def forward(self, batch: Mapping[str, Any]) -> Tensor:
        return self.compute_loss(batch)

    def compute_loss(self, batch: Mapping[str, Any], generator: torch.Generator | None = None) -> Tensor:
        """Epsilon-prediction (or x0) MSE on a batch of dataset windows: obs (B, To, ...), actions (B, H, A).

        Noise and timesteps come from ``generator`` (validation) or the global RNG (training).
        """
        c = self.config
        actions = self._tensor(batch, c.action_key)
        if actions.ndim != 3 or tuple(actions.shape[1:]) != (c.horizon, c.action_dim):
            raise UserError(
                f"'{c.action_key}' in the batch has shape {tuple(actions.shape)}; expected (B, {c.horizon}, "
                f"{c.action_dim}) (batch, horizon, action_dim). Sample windows with horizon={c.horizon}."
            )
        x0 = self.norms[_module_key(c.action_key)].normalize(actions)  # (B, H, A) in about [-1, 1]
        features = self.encode_observations(self.augment_instructions(batch))  # (B, To, O)
        b = x0.shape[0]
        noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
        t = self.schedule.sample_timesteps(b, generator=generator, device=x0.device)
        pred = self.model(self.schedule.add_noise(x0, noise, t), t, features)
        return F.mse_loss(pred, self.schedule.training_target(x0, noise))

    def augment_instructions(self, batch: Mapping[str, Any]) -> Mapping[str, Any]:
        """``batch`` with ``instruction_augment``'s embeddings in place of the table's rows, in
        training mode when one is set (and the batch names rows by ``task_index``); else ``batch``."""
        if not (
            self.training
            and self.instruction_augment is not None
            and TASK_INDEX_KEY in batch
            and TASK_EMBEDDING_KEY not in batch
        ):
            return batch
        rows = self._task_rows(batch).to(self.device)
        return {**batch, TASK_EMBEDDING_KEY: self.instruction_augment(self.instruction_embeddings, rows)}

    def encode_observations(self, obs: Mapping[str, Any]) -> Tensor:
        """Raw (unnormalised) observation windows (B, To, ...) -> features (B, To, O).

        Language comes from ``task_embedding`` (B, 384), ``task_index`` (B, To) rows of the
        instruction table, or ``task`` (B strings), in that order of preference.
        """
        c = self.config
        inputs: dict[str, Any] = {}
        for key in c.lowdim_keys:
            x = self._tensor(obs, key)
            if x.ndim != 3 or x.shape[1] != c.n_obs_steps:
                raise UserError(
                    f"'{key}' has shape {tuple(x.shape)}; expected (B, {c.n_obs_steps}, dim) with the policy's "
                    f"n_obs_steps={c.n_obs_steps}. Sample windows with n_obs_steps={c.n_obs_steps}."
                )
            inputs[key] = self.norms[_module_key(key)].normalize(x.float())
        for key in c.image_keys:
            inputs[key] = self._tensor(obs, key)
        if c.encoder.use_language:
            inputs[TASK_EMBEDDING_KEY] = self._task_embeddings(obs) * c.instruction_scale
        return self.encoder(inputs)

    def _tensor(self, batch: Mapping[str, Any], key: str) -> Tensor:
        if key not in batch:
            raise UserError(
                f"The batch lacks '{key}'.{did_you_mean(key, batch.keys())} It has {sorted(batch)}; the policy "
                f"needs {[*self.config.lowdim_keys, *self.config.image_keys, self.config.action_key]}."
            )
        return torch.as_tensor(batch[key]).to(self.device, non_blocking=True)

    def _task_embeddings(self, obs: Mapping[str, Any]) -> Tensor:
        if TASK_EMBEDDING_KEY in obs:
            return torch.as_tensor(obs[TASK_EMBEDDING_KEY], device=self.device).float()
        if TASK_INDEX_KEY in obs:
            return self.instruction_embeddings[self._task_rows(obs).to(self.device)]
        if TASK_KEY in obs:
            tasks = obs[TASK_KEY]
            return self.embed_instructions([tasks] if isinstance(tasks, str) else list(tasks))
        raise UserError(
            f"This policy is language-conditioned but the observation has none of '{TASK_KEY}' (instruction "
            f"strings), '{TASK_INDEX_KEY}' or '{TASK_EMBEDDING_KEY}'; it has {sorted(obs)}."
        )

    def _task_rows(self, obs: Mapping[str, Any]) -> Tensor:
        """The instruction-table row of each window's current step, (B,), from ``task_index``."""
        index = torch.as_tensor(obs[TASK_INDEX_KEY])
        index = (index[:, -1] if index.ndim == 2 else index).round().long()  # the current step's task, (B,)
        n = len(self.config.instructions)
        # Checked where the indices are on the host (observations, DataLoader batches): reading
        # them back from a GPU would stall every training step until the GPU caught up. Batches
        # gathered on the GPU come from the store whose task list built this table.
        if index.device.type == "cpu" and len(index) and (int(index.min()) < 0 or int(index.max()) >= n):
            raise UserError(
                f"task_index values {sorted(set(index.tolist()))[:8]} fall outside the policy's {n} instructions. "
                "The policy was built for another episode store's task list."
            )
        return index

    def embed_instructions(self, texts: Sequence[str]) -> Tensor:
        """(B,) instructions -> (B, 384): training instructions from the table, others via MiniLM."""
        keys = [normalize_instruction(t) for t in texts]
        rows = [self._instruction_row.get(k) for k in keys]
        if self.config.instruction_grounding != "none":
            rows = [
                self.groundings[k].row if r is None and k in self.groundings else r
                for k, r in zip(keys, rows)
            ]
        if all(r is not None for r in rows):
            return self.instruction_embeddings[torch.tensor(rows, device=self.device)]
        embeddings = self._sentence_encoder().encode(list(texts)).to(self.device)
        if self.config.instruction_grounding == "none":
            return embeddings
        unseen = [i for i, r in enumerate(rows) if r is None]
        for i, grounding in zip(unseen, self._ground(embeddings[unseen], [texts[i] for i in unseen])):
            self.groundings[keys[i]] = grounding
            rows[i] = grounding.row
            level = logging.WARNING if grounding.confidence < LOW_GROUNDING_CONFIDENCE else logging.INFO
            log.log(
                level,
                "instruction %r read as %r (confidence %.2f)",
                texts[i],
                self.config.instructions[grounding.row],
                grounding.confidence,
            )
        return self.instruction_embeddings[torch.tensor(rows, device=self.device)]

    def _ground(self, embeddings: Tensor, texts: list[str]) -> list[Grounding]:
        encoder = self._sentence_encoder()
        if self._grounder is None:
            self._grounder = InstructionGrounder(
                self.instruction_embeddings,
                self.config.instruction_tasks,
                encoder.word_features(self.config.instructions),
            )
        return self._grounder(embeddings, encoder.word_features(texts))

    def _sentence_encoder(self) -> SentenceEncoder:
        encoder = self.encoder.sentence_encoder
        if encoder is None:
            encoder = self.encoder.sentence_encoder = SentenceEncoder()
        if not self._encoder_seeded:
            # Seed its cache with our table, tagged with the weights that made it, so that
            # the encoder refuses to mix in embeddings from other weights.
            table = self.instruction_embeddings.detach().cpu()
            encoder.add_embeddings(
                {t: table[i] for t, i in self._instruction_row.items()},
                self.config.language_fingerprint or None,
            )
            self._encoder_seeded = True
        return encoder

    def optim_groups(self, weight_decay: float, encoder_weight_decay: float) -> list[dict[str, Any]]:
        """AdamW groups as Diffusion Policy: decay the DP-T's Linear weights by ``weight_decay``; no
        decay on its biases, LayerNorms and position embeddings; ``encoder_weight_decay`` on the encoder."""
        decay, no_decay = [], []
        linear_weights = {id(m.weight) for m in self.model.modules() if isinstance(m, nn.Linear)}
        for p in self.model.parameters():
            (decay if id(p) in linear_weights else no_decay).append(p)
        groups = [
            {"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
            {"params": list(self.encoder.parameters()), "weight_decay": encoder_weight_decay},
        ]
        return [g for g in groups if g["params"]]

    # ------------------------------------------------------------------ inference

    @torch.inference_mode()
    def predict_actions(
        self,
        obs: Mapping[str, Any],
        generator: torch.Generator | None = None,
        noise_scale: float | None = None,
    ) -> Tensor:
        """Observation windows (B, To, ...) -> unnormalised action sequences (B, H, A) from the sampler.

        ``noise_scale`` replaces the sampler config's temperature for this call (``act`` passes
        the instruction's, :meth:`instruction_noise_scale`)."""
        was_training = self.training
        self.eval()
        try:
            features = self.encode_observations(obs)  # (B, To, O)
            b = features.shape[0]
            shape = (b, self.config.horizon, self.config.action_dim)
            x_T = self._initial_noise(shape, generator, features.dtype, noise_scale)

            if self.denoiser_factory is not None:
                denoise = self.denoiser_factory(features)
            else:

                def denoise(x: Tensor, t: int) -> Tensor:
                    return self.model(x, torch.tensor(t, device=x.device), features)

            x0 = self.sampler.sample(denoise, x_T, generator=generator)
            return self.norms[_module_key(self.config.action_key)].unnormalize(x0)
        finally:
            self.train(was_training)

    def _initial_noise(
        self, shape: tuple[int, ...], generator: torch.Generator | None, dtype, scale: float | None = None
    ) -> Tensor:
        """x_T for the sampler, scaled by ``scale`` or else the sampler config's ``noise_scale`` (its temperature)."""
        x_T = torch.randn(shape, generator=generator, device=self.device, dtype=dtype)
        if scale is None:
            scale = self.sampler_config.noise_scale if self.sampler_config is not None else 1.0
        return x_T if scale == 1.0 else x_T * scale

    def predict_actions_guided(
        self,
        obs: Mapping[str, Any],
        prefix: Tensor,
        weights: Tensor,
        generator: torch.Generator | None = None,
        max_guidance: float = 5.0,
        noise_scale: float | None = None,
    ) -> Tensor:
        """``predict_actions`` inpainting towards ``prefix`` (H, A), normalised, with soft mask ``weights`` (H,)."""
        from dreamrt.policies.guidance import guided_sample

        was_training = self.training
        self.eval()
        try:
            # Outside inference mode: autograd must be able to save what the denoiser closes over.
            with torch.no_grad():
                features = self.encode_observations(obs)  # (B, To, O)
            shape = (features.shape[0], self.config.horizon, self.config.action_dim)
            x_T = self._initial_noise(shape, generator, features.dtype, noise_scale)

            def denoise(x: Tensor, t: int) -> Tensor:
                return self.model(x, torch.tensor(t, device=x.device), features)

            x0 = guided_sample(
                denoise, self.sampler, x_T, prefix, weights, max_guidance=max_guidance, generator=generator
            )
            return self.norms[_module_key(self.config.action_key)].unnormalize(x0.detach())
        finally:
            self.train(was_training)

    def _guidance_in_horizon(
        self, prefix_actions: np.ndarray, weights: np.ndarray, first: int
    ) -> tuple[Tensor, Tensor]:
        """A chunk-indexed prefix (K, A) in action units and weights (K,) -> normalised (H, A) and (H,)."""
        c = self.config
        prefix_actions = np.asarray(prefix_actions, dtype=np.float32)
        weights = np.asarray(weights, dtype=np.float32)
        k = len(weights)
        if prefix_actions.shape != (k, c.action_dim) or k > c.horizon - first:
            raise UserError(
                f"act_guided got prefix_actions {prefix_actions.shape} and weights {weights.shape}; expected "
                f"(K, {c.action_dim}) and (K,) with K <= {c.horizon - first} (the chunk's length)."
            )
        if not (np.all(np.isfinite(prefix_actions)) and np.all((weights >= 0) & (weights <= 1))):
            raise UserError("act_guided needs finite prefix_actions and weights in [0, 1].")
        norm = self.norms[_module_key(c.action_key)]
        prefix = torch.zeros(c.horizon, c.action_dim, device=self.device)
        w = torch.zeros(c.horizon, device=self.device)
        with torch.no_grad():
            prefix[first : first + k] = norm.normalize(torch.from_numpy(prefix_actions).to(self.device))
        w[first : first + k] = torch.from_numpy(weights).to(self.device)
        return prefix, w

    def reset(self, seed: int | None = None) -> None:
        """Clear the observation history; ``seed`` restarts the sampling noise (None: keep its stream)."""
        self._history.clear()
        if seed is not None:
            self._generator = torch.Generator(device=self.device).manual_seed(int(seed))
        elif self._generator.device != self.device:
            self._generator = torch.Generator(device=self.device).manual_seed(0)

    def observe(self, observation: Observation) -> None:
        """Record a control step's observation without sampling (the steps between ``act`` calls).

        The history must hold consecutive control steps, as in training: a caller that
        executes a chunk step by step passes every step's observation, to ``act`` when it
        wants new actions and to ``observe`` otherwise.
        """
        self._push(observation)

    def _push(self, observation: Observation) -> dict[str, np.ndarray]:
        c = self.config
        frame = {}
        for key in [*c.lowdim_keys, *c.image_keys]:
            if key not in observation:
                raise UserError(
                    f"The observation lacks '{key}'.{did_you_mean(key, observation.keys())} It has "
                    f"{sorted(observation)}; this policy reads {[*c.lowdim_keys, *c.image_keys]}."
                )
            frame[key] = np.array(observation[key])  # a copy: callers may reuse their buffers
        if not self._history:
            self._history.extend([frame] * c.n_obs_steps)  # pad the history by repeating the first step
        else:
            self._history.append(frame)
        return frame

    def act(self, observation: Observation) -> ActionChunk:
        """Record ``observation`` as the current step and return the next Ta actions (see the module docstring)."""
        return self._act(observation, None)

    def act_guided(
        self, observation: Observation, prefix_actions: np.ndarray, weights: np.ndarray
    ) -> ActionChunk:
        """``act`` with real-time chunking's guided inpainting towards ``prefix_actions``.

        ``prefix_actions`` (K, A) in action units and ``weights`` (K,) in [0, 1] index the chunk
        ``act`` returns (K <= Ta; the rest is free). They are placed at the chunk's offset in the
        full prediction horizon (weight 0 on the To - 1 steps before it and past it) and the
        sampler runs under :func:`dreamrt.policies.guidance.guided_sample`. Guidance needs the
        denoiser's gradient, so it always runs the torch network, without a BAC cache or ONNX
        Runtime. All-zero weights cost nothing extra.
        """
        return self._act(observation, (prefix_actions, weights))

    def _act(self, observation: Observation, guidance: tuple[np.ndarray, np.ndarray] | None) -> ActionChunk:
        c = self.config
        start = time.perf_counter()
        frame = self._push(observation)
        obs: dict[str, Any] = {
            key: torch.from_numpy(np.stack([f[key] for f in self._history])[None]) for key in frame
        }  # (1, To, ...)
        if c.encoder.use_language:
            if TASK_KEY not in observation:
                raise UserError(
                    f"This policy follows instructions: the observation needs '{TASK_KEY}' (a string); it has "
                    f"{sorted(observation)}."
                )
            obs[TASK_EMBEDDING_KEY] = self.embed_instructions([observation[TASK_KEY]])
            noise_scale = self.instruction_noise_scale(observation[TASK_KEY])
        else:
            noise_scale = None
        if self._generator.device != self.device:
            self.reset(None)
        first = c.n_obs_steps - 1
        if guidance is not None and np.any(np.asarray(guidance[1]) != 0):
            prefix, weights = self._guidance_in_horizon(*guidance, first)
            actions = self.predict_actions_guided(
                obs, prefix, weights, generator=self._generator, noise_scale=noise_scale
            )[0]
        else:
            predicted = self.predict_actions(obs, generator=self._generator, noise_scale=noise_scale)
            actions = predicted[0]  # (H, A)
        chunk = actions[first : first + c.n_action_steps].float().cpu().numpy()  # (Ta, A)
        info = {
            "sampler": self.sampler_config.name
            if self.sampler_config is not None
            else type(self.sampler).__name__,
            "sampler_steps": getattr(self.sampler, "num_steps", None),
            "latency_s": time.perf_counter() - start,
        }
        if self.groundings:  # what an unseen wording was read as, for the operator's logs
            grounding = self.groundings.get(normalize_instruction(observation.get(TASK_KEY) or ""))
            if grounding is not None:
                info["instruction_grounded_as"] = self.config.instructions[grounding.row]
                info["instruction_grounding_confidence"] = grounding.confidence
        return ActionChunk(actions=chunk, info=info)


# ---------------------------------------------------------------------------- building, saving, loading


def build_diffusion_policy(
    config: DiffusionPolicyConfig,
    normalizer: Normalizer,
    *,
    instruction_embeddings: Tensor | None = None,
    language_fingerprint: str = "",
) -> DiffusionPolicy:
    """A freshly initialised policy (weights from ``torch.manual_seed``)."""
    if language_fingerprint:
        config = replace(config, language_fingerprint=language_fingerprint)
    return DiffusionPolicy(config, normalizer, instruction_embeddings=instruction_embeddings)


def checkpoint_config(policy: DiffusionPolicy) -> dict[str, Any]:
    """The policy's config.yaml mapping, with the sampler it currently uses when that has a config."""
    config = policy.config
    if policy.sampler_config is not None:
        config = replace(config, sampler=policy.sampler_config)
    return asdict(config)


def save_diffusion_policy(
    policy: DiffusionPolicy, path: str | Path, *, step: int = 0, overwrite: bool = False
) -> Path:
    """Write an inference checkpoint (kind ``dpt_policy``) of ``policy``'s current weights."""
    from dreamrt.training.checkpoint import save_checkpoint

    return save_checkpoint(
        path,
        model_state=policy.state_dict(),
        config=checkpoint_config(policy),
        normalizer=policy.normalizer.to_dict(),
        step=step,
        kind=POLICY_KIND,
        overwrite=overwrite,
    )


def load_diffusion_policy(
    path: str | Path,
    sampler: SamplerConfig | None = None,
    *,
    n_action_steps: int | None = None,
    instruction_grounding: str | None = None,
    device: str | torch.device = "cpu",
) -> DiffusionPolicy:
    """Load a ``dpt_policy`` checkpoint (a checkpoint directory, or a run directory for its newest one).

    ``sampler`` replaces the sampler saved in the checkpoint, ``n_action_steps`` its executed
    chunk length (Ta; the network and its weights do not depend on it), ``instruction_grounding``
    how it reads instructions outside its table. The policy comes back
    in eval mode, on ``device``, reset with seed 0.
    """
    from dreamrt.training.checkpoint import config_from_dict, load_checkpoint, load_into

    ckpt = load_checkpoint(path, kind=POLICY_KIND)
    config = config_from_dict(DiffusionPolicyConfig, ckpt.config, source=f"{ckpt.path}/config.yaml")
    if sampler is not None:
        config = replace(config, sampler=sampler)
    if n_action_steps is not None:
        config = replace(config, n_action_steps=n_action_steps)  # re-validated by the config
    if instruction_grounding is not None:
        config = replace(config, instruction_grounding=instruction_grounding)
    policy = DiffusionPolicy(config, Normalizer.from_dict(ckpt.normalizer))
    load_into(policy, ckpt)
    policy.eval().requires_grad_(False).to(device)
    policy.reset(0)
    return policy
