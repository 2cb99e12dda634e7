"""A learned policy that drives until the scripted expert takes over: on-policy corrections.

A policy trained on expert demonstrations fails in states the expert never visits (a grasp
closed on air 3 cm above the lever, an arm hovering beside the block). Behaviour cloning has
no data there, so nothing teaches it to recover. DAgger's answer is to label the states the
*learner* reaches with what the expert would do from them; on a physical robot this is a human
taking over the controls (HG-DAgger), here it is the scripted expert, which plans each task from
whatever state it is handed (:mod:`dreamrt.sim.expert`).

:class:`ExpertTakeover` is one :class:`~dreamrt.policies.protocol.Policy` to the rollout driver.
Each subtask (every ``reset``) it draws a takeover step uniformly from ``after_steps``; the
learner acts until then (its last chunk cut short so that it stops exactly there) and the
expert acts from then to the end of the subtask. A subtask the learner finishes before its
takeover step involves no expert at all. Every chunk says who produced it in
``info["actor"]`` (``"learner"`` or ``"expert"``), which ``dreamrt record`` reads to keep only
the expert's frames (:mod:`dreamrt.sim.record`, ``takeover_after``).

A late takeover window is deliberate: the expert starts each plan by rising clear of the scene,
so taking over mid-approach would teach "go back up" in states where the demonstrations say
"keep descending". Taking over only after the learner has had longer than the expert usually
needs labels the states where the learner is stuck, which is where it needs labels.
"""

from __future__ import annotations

import numpy as np

from dreamrt.errors import UserError
from dreamrt.policies.protocol import ActionChunk, Observation, Policy, PolicySpec

LEARNER = "learner"
EXPERT = "expert"


def check_after_steps(after_steps, max_steps_per_subtask: int | None = None) -> tuple[int, int]:
    """``after_steps`` as a validated (first, last) pair of control steps."""
    try:
        first, last = (int(s) for s in after_steps)
    except (TypeError, ValueError):
        raise UserError(
            f"takeover_after={after_steps!r}; expected two step counts [first, last] (e.g. [150, 300])."
        ) from None
    if not 1 <= first <= last:
        raise UserError(f"takeover_after=[{first}, {last}]; expected 1 <= first <= last.")
    if max_steps_per_subtask is not None and last > max_steps_per_subtask:
        raise UserError(
            f"takeover_after=[{first}, {last}] reaches past max_steps_per_subtask={max_steps_per_subtask}: "
            "the learner has failed the subtask by then. Lower the last step."
        )
    return first, last


class ExpertTakeover:
    """The learner acts until a per-subtask takeover step, then the expert; see the module docstring."""

    def __init__(self, learner: Policy, expert: Policy, after_steps=(150, 300)):
        self.after_steps = check_after_steps(after_steps)
        if learner.spec.action_mode != expert.spec.action_mode:
            raise UserError(
                f"The learner acts in {learner.spec.action_mode!r} and the expert in {expert.spec.action_mode!r}; "
                "both must speak the env's action mode."
            )
        self.learner = learner
        self.expert = expert
        self.spec: PolicySpec = learner.spec
        self.image_keys = list(getattr(learner, "image_keys", None) or [])
        self.reset(0)

    @property
    def expert_acting(self) -> bool:
        return self._expert_acting

    @property
    def takeover_step(self) -> int:
        """The control step of this subtask at which the expert takes over."""
        return self._takeover_step

    def reset(self, seed: int | None = None) -> None:
        seeds = np.random.SeedSequence(seed).generate_state(3)
        first, last = self.after_steps
        self._takeover_step = int(np.random.default_rng(seeds[0]).integers(first, last + 1))
        self._steps = 0  # control steps of this subtask handed to act or observe
        self._expert_acting = False
        self.learner.reset(int(seeds[1] >> 1))
        self.expert.reset(int(seeds[2] >> 1))

    def observe(self, observation: Observation) -> None:
        self._steps += 1
        (self.expert if self._expert_acting else self.learner).observe(observation)

    def act(self, observation: Observation) -> ActionChunk:
        if not self._expert_acting and self._steps >= self._takeover_step:
            self._expert_acting = True
        self._steps += 1
        if self._expert_acting:
            chunk = self.expert.act(observation)
            return ActionChunk(chunk.actions, chunk.start_step, {**chunk.info, "actor": EXPERT})
        chunk = self.learner.act(observation)
        # Cut the chunk so the learner's last action falls just before the takeover step.
        keep = max(1, self._takeover_step - (self._steps - 1))
        return ActionChunk(chunk.actions[:keep], chunk.start_step, {**chunk.info, "actor": LEARNER})


def make_takeover_policy(learner_cfg, env_cfg, expert_noise, after_steps) -> ExpertTakeover:
    """Build the learner (a checkpoint) and the scripted expert for ``env_cfg`` (picklable with
    ``functools.partial``, so that each recording worker builds its own pair)."""
    from dataclasses import replace

    from dreamrt.policies.factory import make_policy
    from dreamrt.sim.env import CONTROL_HZ
    from dreamrt.sim.expert import ScriptedExpert

    if learner_cfg.path is None:
        raise UserError(
            "takeover_after needs a learned policy to take over from: pass policy.path=CKPT "
            f"(got the built-in policy {learner_cfg.name!r})."
        )
    learner = make_policy(
        learner_cfg, action_dim=7, rate_hz=CONTROL_HZ, scene=env_cfg.scene, action_mode=env_cfg.action_mode
    )
    if expert_noise is not None:
        # The start offset varies where demonstrations begin; here the learner decided that.
        expert_noise = replace(expert_noise, start_mm=0.0)
    expert = ScriptedExpert(scene=env_cfg.scene, noise=expert_noise, action_mode=env_cfg.action_mode)
    return ExpertTakeover(learner, expert, after_steps)
