"""Consistency distillation of the dynamics model: the objective on a tiny model, and the job."""

import pytest
import torch

from dreamrt.errors import UserError
from dreamrt.world_models.distill import WorldModelDistillConfig, consistency_loss, direct_loss
from dreamrt.world_models.dynamics import FrameCond, NextFrameDiT, preset
from dreamrt.world_models.sampling import FrameSamplerConfig, context_frames, generate_uncached


def _teacher(**overrides) -> NextFrameDiT:
    """A tiny model whose velocity field is far from zero (adaLN-Zero starts it at exactly zero)."""
    torch.manual_seed(0)
    model = NextFrameDiT(preset("tiny", action_dim=2, state_dim=0, **overrides))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.15 * torch.randn_like(p))
    return model.eval().requires_grad_(False)


def _clips(b: int, t: int, seed: int) -> tuple[torch.Tensor, FrameCond]:
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(b, 1, 4, 4, 4, generator=g)
    latents = base + 0.1 * torch.randn(b, t, 4, 4, 4, generator=g).cumsum(1)  # slowly changing frames
    actions = torch.rand(b, t, 2, generator=g) * 2 - 1
    valid = torch.ones(b, t, dtype=torch.bool)
    valid[:, 0] = False
    return latents, FrameCond(actions.roll(1, 1), torch.zeros(b, t, 0), valid)


def _pick(cond: FrameCond, i: int, lo: int, hi: int) -> FrameCond:
    return FrameCond(
        cond.actions[i : i + 1, lo:hi], cond.states[i : i + 1, lo:hi], cond.valid[i : i + 1, lo:hi]
    )


def _gap_to_teacher(student: NextFrameDiT, teacher: NextFrameDiT, latents, cond) -> float:
    """Mean squared distance between the student's 1-step frame and the teacher's 8-step Euler frame,
    generated after 3 context frames with the same noise."""

    def teacher_frame(i, ctx, nxt):
        return generate_uncached(teacher, ctx, nxt, FrameSamplerConfig(steps=8, seed=i, temperature=1.0))[0]

    return _one_step_gap(student, teacher_frame, latents, cond, temperature=1.0)


def test_consistency_distillation_brings_one_step_frames_to_the_teachers():
    teacher = _teacher()
    student = NextFrameDiT(teacher.config)
    student.load_state_dict(teacher.state_dict())
    cfg = WorldModelDistillConfig(teacher="t", store="s", teacher_steps=8, clip_frames=4, max_targets=2)
    test_latents, test_cond = _clips(8, 4, seed=123)
    before = _gap_to_teacher(student.eval(), teacher, test_latents, test_cond)
    _fit(consistency_loss, student, teacher, cfg, clip_seeds=range(250))
    after = _gap_to_teacher(student, teacher, test_latents, test_cond)
    assert after < 0.2 * before, (before, after)


def test_distill_config_errors():
    with pytest.raises(UserError, match="max_targets"):
        WorldModelDistillConfig(teacher="t", store="s", clip_frames=4, max_targets=4)
    with pytest.raises(UserError, match="teacher_steps"):
        WorldModelDistillConfig(teacher="t", store="s", teacher_steps=0)


def test_consistency_loss_reads_context_from_context_latents():
    teacher = _teacher()
    cfg = WorldModelDistillConfig(teacher="t", store="s", teacher_steps=4, clip_frames=5, max_targets=1)
    latents, cond = _clips(4, 5, seed=7)

    def loss(context_latents=None) -> float:
        value, _ = consistency_loss(
            teacher, teacher, latents, cond, cfg, torch.Generator().manual_seed(0), context_latents
        )
        return float(value.detach())

    base = loss()
    assert loss(latents.clone()) == base
    other_target = latents.clone()
    other_target[:, -1] += 1.0
    assert loss(other_target) == base  # targets are noised from the real frames
    other_anchor = latents.clone()
    other_anchor[:, -2] += 1.0
    assert loss(other_anchor) != base
    with pytest.raises(UserError, match="rollout_prob needs clip_frames"):
        WorldModelDistillConfig(teacher="t", store="s", clip_frames=4, max_targets=3, rollout_prob=0.5)
    with pytest.raises(UserError, match="rollout_prob must be"):
        WorldModelDistillConfig(teacher="t", store="s", rollout_prob=2.0)


def _one_step_gap(student: NextFrameDiT, reference, latents, cond, temperature: float = 0.0) -> float:
    """Mean squared distance of the student's 1-step frame after 3 context frames (noise seeded by the
    clip's index) from ``reference(i, ctx, next_cond)``."""
    gaps = []
    for i in range(latents.shape[0]):
        ctx = context_frames(latents[i : i + 1, :3], _pick(cond, i, 0, 3), FrameSamplerConfig())
        nxt = _pick(cond, i, 3, 4)
        sampler = FrameSamplerConfig(solver="x0", steps=1, seed=i, temperature=temperature)
        got, _ = generate_uncached(student, ctx, nxt, sampler)
        gaps.append(float((got - reference(i, ctx, nxt)).pow(2).mean()))
    return sum(gaps) / len(gaps)


def _fit(loss_fn, student, teacher, cfg, clip_seeds) -> None:
    """Adam steps of ``loss_fn`` (consistency_loss or direct_loss), one batch of clips per seed; leaves the student in eval mode."""
    opt = torch.optim.Adam(student.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(1)
    student.train()
    for seed in clip_seeds:
        latents, cond = _clips(16, 4, seed=seed)
        loss, info = loss_fn(student, teacher, latents, cond, cfg, generator=g)
        opt.zero_grad()
        loss.backward()
        opt.step()
        assert 1 <= info["targets_per_clip"] <= 2
    student.eval()


@pytest.mark.parametrize("source", ["noise", "last_frame"])
def test_direct_distillation_brings_temperature_zero_frames_to_the_teachers_sample(source):
    teacher = _teacher(source=source, source_sigma=0.5)
    student = NextFrameDiT(teacher.config)
    student.load_state_dict(teacher.state_dict())
    cfg = WorldModelDistillConfig(
        teacher="t", store="s", clip_frames=4, max_targets=2, direct_prob=1.0, direct_teacher_steps=4
    )
    test_latents, test_cond = _clips(8, 4, seed=123)

    def teacher_sample(i, ctx, nxt):
        return generate_uncached(teacher, ctx, nxt, FrameSamplerConfig(steps=4))[0]

    before = _one_step_gap(student, teacher_sample, test_latents, test_cond)
    _fit(direct_loss, student, teacher, cfg, range(200))
    after = _one_step_gap(student, teacher_sample, test_latents, test_cond)
    assert after < 0.2 * before, (before, after)


def test_direct_distillation_towards_data_fits_the_recorded_frames():
    teacher = _teacher(source="last_frame", source_sigma=0.5)
    student = NextFrameDiT(teacher.config)
    student.load_state_dict(teacher.state_dict())
    cfg = WorldModelDistillConfig(
        teacher="t", store="s", clip_frames=4, max_targets=1, direct_prob=1.0, direct_target="data"
    )
    latents, cond = _clips(16, 4, seed=5)  # the training clips themselves: the student must fit them

    def recorded(i, ctx, nxt):
        return latents[i : i + 1, 3:4]

    before = _one_step_gap(student, recorded, latents, cond)
    _fit(direct_loss, student, teacher, cfg, [5] * 200)
    after = _one_step_gap(student, recorded, latents, cond)
    assert after < 0.2 * before, (before, after)
    with pytest.raises(UserError, match="direct_target"):
        WorldModelDistillConfig(teacher="t", store="s", direct_target="truth")
    with pytest.raises(UserError, match="direct_prob"):
        WorldModelDistillConfig(teacher="t", store="s", direct_prob=1.5)


def test_direct_target_data_on_rollouts_uses_the_recorded_frames_only_after_generated_context():
    teacher = _teacher(source="last_frame", source_sigma=0.5)
    student = NextFrameDiT(teacher.config)
    student.load_state_dict(teacher.state_dict())
    with torch.no_grad():  # a student that differs from its teacher, so no loss is zero
        for p in student.parameters():
            p.add_(0.05 * torch.randn_like(p))
    latents, cond = _clips(4, 5, seed=9)
    generated = latents + 0.05 * torch.randn_like(latents)

    def loss(target: str, context_latents=None) -> float:
        cfg = WorldModelDistillConfig(
            teacher="t", store="s", clip_frames=5, max_targets=2, direct_prob=1.0, direct_target=target
        )
        value, _ = direct_loss(
            student, teacher, latents, cond, cfg, torch.Generator().manual_seed(0), context_latents
        )
        return float(value.detach())

    assert loss("data_on_rollouts") == loss("teacher") != loss("data")
    assert loss("data_on_rollouts", generated) == loss("data", generated) != loss("teacher", generated)
