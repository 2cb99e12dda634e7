"""The world-model checkpoints shipped in the repository load, fit together, and generate."""

import json

import torch

from dreamrt.policies.shipped import shipped_checkpoint
from dreamrt.world_models.dynamics import load_dynamics
from dreamrt.world_models.sampling import FrameSamplerConfig, Rollout
from dreamrt.world_models.tokenizer import load_tokenizer


def test_shipped_world_model_loads_and_generates_a_frame():
    tok = load_tokenizer("shipped:wm_tokenizer")
    teacher, teacher_norm = load_dynamics("shipped:wm_dynamics")
    student, student_norm = load_dynamics("shipped:wm_student")
    c = teacher.config
    assert student.config == c and student_norm == teacher_norm and "action" in teacher_norm["features"]
    assert (c.latent_channels, c.latent_size) == (tok.config.latent_channels, tok.config.latent_size)
    assert c.state_dim == 0 and c.source == "last_frame"  # actions only: WorldModelEnv runs it closed loop
    # The figures in docs/benchmarks.md were measured on these weights' held-out episodes.
    summary = json.loads((shipped_checkpoint("wm_student") / "summary.json").read_text())
    assert summary["tokenizer"] == "shipped:wm_tokenizer" and summary["val_episodes"]

    torch.manual_seed(0)
    with torch.no_grad():
        frames = torch.rand(c.window - 1, 3, tok.config.image_size, tok.config.image_size)
        latents = tok.encode(frames)[None]
        rollout = Rollout(student, FrameSamplerConfig(solver="x0", steps=1))
        rollout.prefill(latents, torch.zeros(1, c.window - 1, c.action_dim))
        z = rollout.step(torch.zeros(1, c.action_dim))
        image = tok.decode(z, tok.detail(frames[-1:]))
    assert image.shape == (1, 3, tok.config.image_size, tok.config.image_size) and torch.isfinite(image).all()
