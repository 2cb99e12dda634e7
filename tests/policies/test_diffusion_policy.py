"""DiffusionPolicy: chunk slicing, observation history, seeding, loss, sampler plug point, checkpoints."""

from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dreamrt.episodes.normalize import Normalizer
from dreamrt.errors import UserError
from dreamrt.policies.diffusion_policy import (
    POLICY_KIND,
    DiffusionPolicy,
    DiffusionPolicyConfig,
    load_diffusion_policy,
    save_diffusion_policy,
)
from dreamrt.policies.dpt import preset
from dreamrt.policies.encoders import ObsEncoderConfig
from dreamrt.policies.language import EMBED_DIM
from dreamrt.policies.protocol import Policy
from dreamrt.policies.schedulers import SamplerConfig
from dreamrt.training.checkpoint import load_checkpoint

TO, H, TA = 2, 8, 3  # the tiny preset's To and horizon; Ta
ACTION_MIN, ACTION_MAX = np.array([-2.0, -1.0]), np.array([2.0, 3.0])


@pytest.fixture(autouse=True)
def one_thread():
    # Tiny models run fastest on one intra-op thread, and much faster when the cores are shared.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make_normalizer() -> Normalizer:
    stats = {
        "observation.state": {
            "min": [-1.0, -2.0, 0.0],
            "max": [1.0, 2.0, 4.0],
            "mean": [0, 0, 2],
            "std": [1, 1, 1],
        },
        "action": {"min": ACTION_MIN.tolist(), "max": ACTION_MAX.tolist(), "mean": [0, 1], "std": [1, 1]},
    }
    return Normalizer.from_stats(stats, {"observation.state": "min_max", "action": "min_max"})


def make_policy(
    *, language: bool = False, sampler: SamplerConfig | None = None, seed: int = 0, table=None, angles=()
):
    enc = ObsEncoderConfig(
        lowdim_keys=["observation.state"],
        lowdim_dims=[3],
        lowdim_angles=[list(angles)] if angles else [],
        use_language=language,
        language_dim=8,
    )
    cfg = DiffusionPolicyConfig(
        encoder=enc,
        model=preset("tiny", action_dim=2, obs_dim=enc.obs_feature_dim, horizon=H, n_obs_steps=TO),
        sampler=sampler or SamplerConfig(name="ddim", num_steps=5),
        n_action_steps=TA,
        instructions=["go left", "go right"] if language else [],
    )
    torch.manual_seed(seed)
    if language and table is None:
        table = F.normalize(torch.randn(2, EMBED_DIM), dim=-1)
    return DiffusionPolicy(cfg, make_normalizer(), instruction_embeddings=table).eval()


def obs(i: float, task: str | None = None) -> dict:
    o = {"observation.state": np.array([0.1 * i, -0.2 * i, 1.0 + 0.3 * i], np.float32)}
    if task is not None:
        o["task"] = task
    return o


def window(*frames: dict) -> dict:
    return {"observation.state": torch.from_numpy(np.stack([f["observation.state"] for f in frames])[None])}


class RampSampler:
    """A stand-in sampler (the plug point): x0[b, h, a] = -0.9 + 0.2 h + 0.1 a, after calling the denoiser once."""

    def __init__(self):
        self.calls = 0

    def sample(self, denoise, x_T, generator=None):
        self.calls += 1
        out = denoise(x_T, 3)
        assert out.shape == x_T.shape
        b, h, a = x_T.shape
        ramp = -0.9 + 0.2 * torch.arange(h, dtype=x_T.dtype)[:, None] + 0.1 * torch.arange(a, dtype=x_T.dtype)
        return ramp.expand(b, h, a).clone()


def test_act_returns_the_executable_slice_unnormalised():
    policy = make_policy()
    assert isinstance(policy, Policy)
    assert (policy.spec.horizon, policy.spec.n_obs_steps, policy.spec.action_dim) == (TA, TO, 2)
    ramp = RampSampler()
    policy.sampler = ramp
    assert policy.sampler_config is None
    policy.reset(0)
    chunk = policy.act(obs(0))
    assert ramp.calls == 1 and chunk.actions.shape == (TA, 2) and chunk.actions.dtype == np.float32
    normed = -0.9 + 0.2 * np.arange(H)[:, None] + 0.1 * np.arange(2)  # (H, A) in [-1, 1]
    expected = ACTION_MIN + (normed + 1.0) / 2.0 * (ACTION_MAX - ACTION_MIN)  # min-max inverse
    np.testing.assert_allclose(chunk.actions, expected[TO - 1 : TO - 1 + TA], rtol=1e-5, atol=1e-6)
    assert chunk.info["sampler"] == "RampSampler"
    with pytest.raises(UserError, match="sample"):
        policy.sampler = object()


def test_history_pads_at_reset_then_rolls_over_consecutive_steps():
    policy = make_policy()
    g = torch.Generator().manual_seed(7)
    first = slice(TO - 1, TO - 1 + TA)

    def ref(*frames):
        return policy.predict_actions(window(*frames), generator=g)[0, first].numpy()

    policy.reset(7)
    np.testing.assert_array_equal(policy.act(obs(1)).actions, ref(obs(1), obs(1)))  # padded by repetition
    np.testing.assert_array_equal(policy.act(obs(2)).actions, ref(obs(1), obs(2)))
    policy.observe(obs(3))  # a step executed without asking for actions
    np.testing.assert_array_equal(policy.act(obs(4)).actions, ref(obs(3), obs(4)))
    # The history matters: the same current observation after another one gives other actions.
    g2 = torch.Generator().manual_seed(99)
    a = policy.predict_actions(window(obs(1), obs(4)), generator=g2)
    g2.manual_seed(99)
    assert not torch.equal(a, policy.predict_actions(window(obs(3), obs(4)), generator=g2))
    policy.reset(7)  # forgets the history and restarts the noise
    g.manual_seed(7)
    np.testing.assert_array_equal(policy.act(obs(5)).actions, ref(obs(5), obs(5)))


def test_reset_seed_fixes_the_sampling_noise():
    policy = make_policy(sampler=SamplerConfig(name="ddpm", num_steps=10))  # stochastic steps too
    runs = []
    for seed in (3, 3, 4):
        policy.reset(seed)
        runs.append([policy.act(obs(i)).actions for i in range(2)])
    np.testing.assert_array_equal(runs[0][0], runs[1][0])
    np.testing.assert_array_equal(runs[0][1], runs[1][1])
    assert not np.array_equal(runs[0][0], runs[2][0])
    policy.reset(3)
    policy.act(obs(0))
    policy.reset(None)  # keeps the noise stream going
    assert not np.array_equal(policy.act(obs(0)).actions, runs[0][0])


def test_compute_loss_is_epsilon_mse_on_normalised_actions():
    policy = make_policy().train()
    b = 4
    g = torch.Generator().manual_seed(0)
    lo, hi = torch.tensor(ACTION_MIN, dtype=torch.float32), torch.tensor(ACTION_MAX, dtype=torch.float32)
    batch = {
        "observation.state": torch.randn(b, TO, 3, generator=g),
        "action": lo + (hi - lo) * torch.rand(b, H, 2, generator=g),
    }
    policy.eval()
    loss = policy.compute_loss(batch, generator=torch.Generator().manual_seed(1))
    # The same computation by hand.
    g1 = torch.Generator().manual_seed(1)
    x0 = (batch["action"] - lo) / (hi - lo) * 2 - 1
    noise = torch.randn(x0.shape, generator=g1)
    t = torch.randint(0, 100, (b,), generator=g1)
    ab = policy.schedule.alphas_cumprod[t].float()[:, None, None]
    noisy = ab.sqrt() * x0 + (1 - ab).sqrt() * noise
    features = policy.encoder(
        {
            "observation.state": (batch["observation.state"] - torch.tensor([-1.0, -2.0, 0.0]))
            / torch.tensor([2.0, 4.0, 4.0])
            * 2
            - 1
        }
    )
    want = F.mse_loss(policy.model(noisy, t, features), noise)
    torch.testing.assert_close(loss, want)
    policy.train()
    loss = policy(batch)  # forward is compute_loss (what DDP calls)
    loss.backward()
    assert loss.ndim == 0 and torch.isfinite(loss)
    assert all(p.grad is not None for p in policy.parameters())
    with pytest.raises(UserError, match="lacks 'action'"):
        policy.compute_loss({"observation.state": batch["observation.state"]})
    with pytest.raises(UserError, match="horizon"):
        policy.compute_loss({**batch, "action": batch["action"][:, :5]})
    with pytest.raises(UserError, match="n_obs_steps"):
        policy.compute_loss({**batch, "observation.state": batch["observation.state"][:, :1]})


def test_language_batches_use_task_index_rows():
    policy = make_policy(language=True)
    batch = {"observation.state": torch.zeros(2, TO, 3), "task_index": torch.tensor([[0.0, 1.0], [1.0, 0.0]])}
    by_index = policy.encode_observations(batch)
    by_text = policy.encode_observations(
        {"observation.state": batch["observation.state"], "task": ["go right", "go left"]}
    )
    torch.testing.assert_close(by_index, by_text)  # the current (last) step's task
    assert policy.encoder.sentence_encoder is None  # known instructions never load the sentence model
    with pytest.raises(UserError, match="outside"):
        policy.encode_observations({**batch, "task_index": torch.tensor([[0.0, 2.0], [0.0, 0.0]])})
    with pytest.raises(UserError, match="'task'"):
        policy.act(obs(0))


def test_optim_groups_partition_the_parameters():
    policy = make_policy(language=True)
    groups = policy.optim_groups(1e-3, 1e-6)
    ids = [id(p) for g in groups for p in g["params"]]
    assert sorted(ids) == sorted(id(p) for p in policy.parameters())
    decay = {id(p) for g in groups if g["weight_decay"] == 1e-3 for p in g["params"]}
    assert id(policy.model.out.weight) in decay and id(policy.model.out.bias) not in decay
    assert id(policy.model.action_pos) not in decay and id(policy.model.norm_out.weight) not in decay
    enc = {id(p) for g in groups if g["weight_decay"] == 1e-6 for p in g["params"]}
    assert enc == {id(p) for p in policy.encoder.parameters()} and enc


def test_config_and_normaliser_are_checked():
    enc = ObsEncoderConfig(lowdim_keys=["observation.state"], lowdim_dims=[3])
    model = preset("tiny", action_dim=2, obs_dim=3, horizon=H, n_obs_steps=TO)
    with pytest.raises(UserError, match="n_action_steps"):
        DiffusionPolicyConfig(encoder=enc, model=model, n_action_steps=H)  # beyond horizon - To + 1
    with pytest.raises(UserError, match="obs_dim"):
        DiffusionPolicyConfig(encoder=enc, model=preset("tiny", action_dim=2, obs_dim=5))
    cfg = DiffusionPolicyConfig(encoder=enc, model=model, n_action_steps=H - TO + 1)
    only_actions = Normalizer.from_stats({"action": {"min": [0, 0], "max": [1, 1]}}, {"action": "min_max"})
    with pytest.raises(UserError, match="observation.state"):
        DiffusionPolicy(cfg, only_actions)
    with pytest.raises(UserError, match="lacks 'observation.state'"):
        DiffusionPolicy(cfg, make_normalizer()).act({"observation.stat": np.zeros(3)})


def test_checkpoint_round_trip_gives_identical_actions(tmp_path):
    policy = make_policy(language=True, seed=3)
    policy.set_sampler(SamplerConfig(name="ddim", num_steps=4, eta=0.5))
    path = save_diffusion_policy(policy, tmp_path / "ckpt", step=12)
    assert load_checkpoint(path).kind == POLICY_KIND
    loaded = load_diffusion_policy(path)
    # Everything rebuilds the same, with the sampler in use (not the one the policy was built with).
    assert loaded.config == replace(policy.config, sampler=SamplerConfig(name="ddim", num_steps=4, eta=0.5))
    ref, got = policy.state_dict(), loaded.state_dict()
    assert ref.keys() == got.keys() and all(torch.equal(ref[k], got[k]) for k in ref)
    assert "instruction_embeddings" in got
    for p in (policy, loaded):
        p.reset(5)
    for i in range(3):
        a = policy.act(obs(i, "go right"))
        b = loaded.act(obs(i, "go  right "))  # instructions are matched after whitespace normalisation
        np.testing.assert_array_equal(a.actions, b.actions)
    assert loaded.encoder.sentence_encoder is None
    ddpm = load_diffusion_policy(path, SamplerConfig(name="ddpm", num_steps=None))
    ddpm.reset(5)
    chunk = ddpm.act(obs(0, "go left"))
    assert chunk.info == {**chunk.info, "sampler": "ddpm", "sampler_steps": 100}
    with pytest.raises(UserError, match="'other'"):
        load_checkpoint(path, kind="other")


def test_angle_inputs_are_read_in_radians_and_survive_a_checkpoint(tmp_path):
    policy = make_policy(angles=[1], seed=4)  # observation.state[1] is an angle, min-max from [-2, 2]
    frames = [obs(i) for i in (1, 2)]
    features = policy.encode_observations(window(*frames))[0]  # (To, 2 kept + sin + cos)
    raw = torch.from_numpy(np.stack([f["observation.state"] for f in frames]))
    torch.testing.assert_close(features[:, 2], torch.sin(raw[:, 1]))
    torch.testing.assert_close(features[:, 3], torch.cos(raw[:, 1]))
    loaded = load_diffusion_policy(save_diffusion_policy(policy, tmp_path / "ckpt"))
    assert loaded.config.encoder.lowdim_angles == [[1]]
    torch.testing.assert_close(
        loaded.encode_observations(window(*frames)), policy.encode_observations(window(*frames))
    )
    for p in (policy, loaded):
        p.reset(2)
    np.testing.assert_array_equal(policy.act(obs(0)).actions, loaded.act(obs(0)).actions)


def test_unknown_instruction_goes_through_the_sentence_encoder(tmp_path):
    from dreamrt.policies.language import SentenceEncoder

    sentences = SentenceEncoder()
    table = sentences.encode(["go left", "go right"])
    policy = make_policy(language=True, table=table)
    policy.config.language_fingerprint = sentences.fingerprint
    loaded = load_diffusion_policy(save_diffusion_policy(policy, tmp_path / "c"))
    emb = loaded.embed_instructions(["go left", "move to the left side"])
    torch.testing.assert_close(emb[0], table[0])
    torch.testing.assert_close(emb[1], sentences.encode(["move to the left side"])[0])
    assert loaded.encoder.sentence_encoder.model_loaded
    loaded.reset(0)
    assert loaded.act(obs(0, "move to the left side")).actions.shape == (TA, 2)


@pytest.mark.parametrize(
    "sampler", [SamplerConfig(name="ddim", num_steps=5), SamplerConfig(name="ddpm", num_steps=10)]
)
def test_act_guided_inpaints_towards_the_prefix_and_is_act_without_weights(sampler):
    policy = make_policy(sampler=sampler)
    policy.reset(11)
    free = policy.act(obs(0)).actions  # (TA, 2)
    policy.reset(11)
    same = policy.act_guided(obs(0), np.zeros((TA, 2), np.float32), np.zeros(TA, np.float32)).actions
    np.testing.assert_array_equal(same, free)  # zero weights: the unguided sampler, same noise

    target = np.array([[1.5, 2.5]] * TA, np.float32)  # inside the action range, far from `free`
    weights = np.array([1.0, 1.0, 0.0], np.float32)  # freeze two actions, leave the last free
    policy.reset(11)
    guided = policy.act_guided(obs(0), target, weights).actions
    far = np.abs(free[:2] - target[:2]).mean()
    near = np.abs(guided[:2] - target[:2]).mean()
    assert near < 0.5 * far, (near, far)
    with pytest.raises(UserError, match="act_guided"):
        policy.act_guided(obs(0), np.zeros((TA + H, 2), np.float32), np.ones(TA + H, np.float32))
    with pytest.raises(UserError, match="act_guided"):
        policy.act_guided(obs(0), target, np.array([2.0, 0.0, 0.0], np.float32))
