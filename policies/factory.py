"""`policy=expert|random` or `policy.path=DIR`: the one way every job picks a policy."""

from __future__ import annotations

from dataclasses import dataclass

from dreamrt.errors import choose
from dreamrt.policies.protocol import Policy

BUILTIN_POLICIES = ("expert", "random")


@dataclass
class PolicyConfig:
    name: str = "expert"  # a built-in policy; ignored when `path` is set
    path: str | None = None  # a checkpoint directory (or a run directory: its newest checkpoint)
    seed: int = 0

    def __post_init__(self) -> None:
        if self.path is None:
            choose("policy", self.name, BUILTIN_POLICIES)


def make_policy(
    cfg: PolicyConfig, *, action_dim: int = 7, rate_hz: float = 30.0, scene: str = "D", expert_noise=None
) -> Policy:
    """Build the configured policy. ``scene`` is the env's scene variant (the expert needs its
    layout); ``expert_noise`` (a ``dreamrt.sim.expert.ExpertNoise`` or None) varies the expert's
    demonstrations and is ignored by other policies."""
    if cfg.path is not None:
        return load_policy(cfg.path)
    if cfg.name == "random":
        from dreamrt.policies.random_policy import RandomPolicy

        return RandomPolicy(action_dim=action_dim, rate_hz=rate_hz, seed=cfg.seed)
    # The expert reads privileged scene state, so it lives with the simulator it scripts.
    from dreamrt.sim.expert import ScriptedExpert

    return ScriptedExpert(scene=scene, seed=cfg.seed, noise=expert_noise)


def load_policy(path: str) -> Policy:
    from dreamrt.errors import UserError
    from dreamrt.training.checkpoint import read_meta, resolve_checkpoint

    checkpoint_dir = resolve_checkpoint(path)
    kind = read_meta(checkpoint_dir).kind
    # Match on the kind string so that choosing a built-in policy never imports torch.
    match kind:
        case "dpt_policy":
            from dreamrt.policies.diffusion_policy import load_diffusion_policy

            return load_diffusion_policy(checkpoint_dir)
        case _:
            raise UserError(
                f"Checkpoint {checkpoint_dir} holds a '{kind}', which is not a policy dreamrt can load "
                "(policies: dpt_policy)."
            )
