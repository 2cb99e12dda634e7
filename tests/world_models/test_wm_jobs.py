"""The world-model jobs end to end on tiny models: `train world-model`, `bench world-model` with
trained checkpoints, WorldModelEnv (gymnasium's checker) and the MuJoCo comparison tool."""

import json

import numpy as np
import pytest
import torch
from gymnasium.utils.env_checker import check_env

from dreamrt.errors import UserError
from dreamrt.world_models import bench, compare
from dreamrt.world_models.dynamics import load_dynamics, preset
from dreamrt.world_models.env import WorldModelEnv
from dreamrt.world_models.quality import ssim
from dreamrt.world_models.sampling import FrameSamplerConfig
from dreamrt.world_models.synthetic import MovingSquareConfig, write_moving_square_store
from dreamrt.world_models.tokenizer import preset as tokenizer_preset
from dreamrt.world_models.train import OptimConfig, TrainWorldModelConfig
from dreamrt.world_models.train import run as train_run


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny actions-only world model trained by the job on a synthetic store: (store, run dir, summary)."""
    root = tmp_path_factory.mktemp("wmjobs")
    store = root / "squares.zarr"
    write_moving_square_store(store, episodes=5, length=30, cfg=MovingSquareConfig(image_size=24, square=6))
    torch.set_num_threads(1)
    cfg = TrainWorldModelConfig(
        store=str(store),
        stage="both",
        state_key="",
        tokenizer_model=tokenizer_preset("tiny"),
        tokenizer_optim=OptimConfig(
            steps=20, batch_size=8, lr=3e-3, warmup_steps=2, log_every=10, save_every=20
        ),
        model=preset("tiny", action_dim=1, state_dim=0),
        sampler=FrameSamplerConfig(steps=2),
        clip_frames=5,
        eval_clips=4,
        val_ratio=0.2,
        optim=OptimConfig(steps=4, batch_size=4, warmup_steps=1, log_every=2, save_every=4),
    )
    summary = train_run(cfg, root / "run").summary
    return store, root / "run", summary


def test_train_world_model_job(trained):
    store, run_dir, summary = trained
    assert summary["stage"] == "both"
    assert summary["tokenizer"]["steps"] == 20 and summary["dynamics"]["steps"] == 4
    assert summary["tokenizer"]["val_psnr_db"] > summary["tokenizer"]["val_psnr_db_initial"]
    saved = json.loads((run_dir / "dynamics" / "summary.json").read_text())
    assert saved["state_key"] == "" and len(saved["val_episodes"]) == 1
    model, _ = load_dynamics(run_dir / "dynamics")
    assert (model.config.action_dim, model.config.state_dim) == (7, 0)


def test_train_world_model_config_errors(trained):
    store = str(trained[0])
    with pytest.raises(UserError, match="Did you mean 'dynamics'"):
        TrainWorldModelConfig(store=store, stage="dynamic")
    with pytest.raises(UserError, match="stage=dynamics needs tokenizer=RUN"):
        TrainWorldModelConfig(store=store, stage="dynamics")
    with pytest.raises(UserError, match="store is required"):
        TrainWorldModelConfig(stage="tokenizer")


def test_ssim():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, 16, 16, generator=g)
    assert torch.allclose(ssim(x, x), torch.ones(2))
    noisy = (x + 0.3 * torch.randn(x.shape, generator=g)).clamp(0, 1)
    slightly = (x + 0.05 * torch.randn(x.shape, generator=g)).clamp(0, 1)
    assert (ssim(noisy, x) < ssim(slightly, x)).all() and (ssim(slightly, x) < 1).all()


def test_bench_trained_rows(trained):
    store, run_dir, _ = trained
    cfg = bench.BenchWorldModelConfig(
        tokenizer=str(run_dir / "tokenizer"),
        dynamics=str(run_dir / "dynamics"),
        store=str(store),
        configs=[
            bench.BenchRowConfig("teacher", "euler", 2, kv_cache=False),
            bench.BenchRowConfig("teacher", "euler", 2),
            bench.BenchRowConfig("few", "x0", 1, speculate=3),
        ],
        horizons=[1, 4],
        frames=6,
        warmup=0,  # timing starts at the first speculation: two whole ones of 3 frames
        tolerance=10.0,  # every action "repeats": all speculated frames are accepted
    )
    summary = bench.run(cfg).summary
    rows = summary["rows"]
    assert [r["sampler"] for r in rows] == ["euler", "euler", "x0", "repeat_last_frame", "real_latents"]
    for r in rows[:3]:
        assert (
            r["fps"] > 0 and 0 < r["peak_fraction"] and -1 <= r["ssim_h4"] <= 1 and np.isfinite(r["psnr_h1"])
        )
        assert {"sampler", "steps", "kv_cache", "speculative", "fps"} <= set(r)
    # Cached and uncached rollouts generate the same frames: same quality, and the cache is cheaper.
    assert rows[0]["psnr_h4"] == rows[1]["psnr_h4"] and rows[0]["dynamics_gflop"] > rows[1]["dynamics_gflop"]
    assert rows[2]["acceptance_rate"] == 1.0 and rows[2]["frames_per_speculation"] == 3.0
    assert rows[3]["fps"] is None and rows[3]["psnr_h1"] > 0
    # The ceiling decodes real latents relative to the last real frame: plain, it is the tokenizer.
    assert rows[4]["psnr_plain_h1"] == pytest.approx(summary["tokenizer_psnr"], abs=1.0)
    assert (
        summary["held_out_episodes"]
        == json.loads((run_dir / "dynamics" / "summary.json").read_text())["val_episodes"]
    )
    assert 0 < summary["tokenizer_psnr"] < 100
    # The gain over repeating the last frame; one held-out episode gives no spread across episodes.
    assert rows[1]["gain_vs_repeat_h4"] == pytest.approx(rows[1]["psnr_h4"] - rows[3]["psnr_h4"], abs=1e-4)
    assert summary["quality_episodes"] == 1 and np.isnan(rows[1]["gain_vs_repeat_se_h4"])
    with pytest.raises(UserError, match="tokenizer=RUN dynamics=RUN store=STORE"):
        bench.BenchWorldModelConfig(dynamics=str(run_dir / "dynamics"))
    with pytest.raises(UserError, match="episodes"):
        bench.BenchWorldModelConfig(**{**cfg.__dict__, "episodes": "some"})

    # episodes="all": every episode of the store (one recorded apart from training), and the standard
    # error of the gain across them.
    every = bench.run(
        bench.BenchWorldModelConfig(
            **{**cfg.__dict__, "episodes": "all", "configs": cfg.configs[1:2], "clips_per_episode": 2}
        )
    ).summary
    assert every["held_out_episodes"] == [0, 1, 2, 3, 4] and every["quality_episodes"] == 5
    assert every["quality_clips"] == 10 and every["rows"][0]["gain_vs_repeat_se_h4"] > 0


@pytest.fixture(scope="module")
def stream(trained):
    """The trained fixture's tokenizer, dynamics model and its store read for timed streams."""
    from dreamrt.world_models.quality import load_eval_data
    from dreamrt.world_models.tokenizer import load_tokenizer

    store, run_dir, _ = trained
    tok = load_tokenizer(run_dir / "tokenizer")
    model, normalizer = load_dynamics(run_dir / "dynamics")
    data = load_eval_data(
        str(store), tok, normalizer, camera="observation.images.static", action_key="action", state_key=""
    )
    return tok, model, data


def test_speculation_rejects_changing_actions(stream):
    from dreamrt.world_models.quality import timed_stream

    tok, model, data = stream
    # The synthetic actions' noise dimensions change every frame: nothing beyond the first frame is accepted.
    out = timed_stream(
        model, tok, data, 0, 8, FrameSamplerConfig(steps=1), context=3, speculate=3, tolerance=1e-6
    )
    # (the stream's tail speculates fewer than 3 frames, so the rate is a little above 1/3)
    assert out["frames_per_speculation"] == 1.0 and out["acceptance_rate"] < 0.5


def test_world_model_env(trained):
    store, run_dir, _ = trained
    env = WorldModelEnv.from_checkpoints(
        # temperature 1: the 4-step model barely moves its frames off the last one at 0
        str(run_dir / "tokenizer"), str(run_dir / "dynamics"), str(store),
        sampler=FrameSamplerConfig(steps=2, temperature=1.0), max_episode_steps=5,
    )  # fmt: skip
    check_env(env, skip_render_check=True)
    obs, info = env.reset(seed=3, options={"episode": 2, "start": 4})
    assert set(obs) == {"observation.images.static"} and obs["observation.images.static"].shape == (16, 16, 3)
    assert info["episode"] == 2 and not info["state_held"]
    frames = [obs["observation.images.static"]]
    for i in range(5):
        obs, reward, terminated, truncated, _ = env.step(env.action_space.sample())
        frames.append(obs["observation.images.static"])
        assert reward == 0.0 and not terminated and truncated == (i == 4)
    assert any(not np.array_equal(a, b) for a, b in zip(frames, frames[1:]))  # the dream moves
    # Same episode, same actions: the same frames (noise is seeded per frame index).
    env.reset(options={"episode": 2, "start": 4})
    again = env.step(np.zeros(7, np.float32))[0]["observation.images.static"]
    env.reset(options={"episode": 2, "start": 4})
    assert np.array_equal(env.step(np.zeros(7, np.float32))[0]["observation.images.static"], again)
    with pytest.raises(UserError, match="unknown option 'episodes'"):
        env.reset(options={"episodes": 1})
    with pytest.raises(UserError, match="start=99"):
        env.reset(options={"episode": 0, "start": 99})
    with pytest.raises(UserError, match="7 finite numbers"):
        env.step(np.zeros(3))


def test_world_model_env_with_a_state_model(trained, tmp_path):
    store, run_dir, _ = trained
    from dreamrt.episodes import Normalizer, open_store
    from dreamrt.world_models.dynamics import NextFrameDiT
    from dreamrt.world_models.tokenizer import load_tokenizer

    model = NextFrameDiT(preset("tiny", action_dim=7, state_dim=15))
    stats = open_store(store).stats
    normalizer = Normalizer.from_stats(stats, {"action": "min_max", "observation.state": "min_max"}).to_dict()
    tok = load_tokenizer(run_dir / "tokenizer")
    with pytest.raises(UserError, match="hold_state=True"):
        WorldModelEnv(tok, model, normalizer, str(store))
    env = WorldModelEnv(tok, model, normalizer, str(store), state_key="observation.state", hold_state=True)
    obs, info = env.reset(seed=0)
    assert info["state_held"] and obs["observation.state"].shape == (15,)
    assert np.array_equal(env.step(np.zeros(7, np.float32))[0]["observation.state"], obs["observation.state"])

    # With a state predictor the env reports the predicted state, in the store's units.
    from dreamrt.world_models.proprio import StatePredictor, StatePredictorConfig

    predictor = StatePredictor(StatePredictorConfig(state_dim=15, action_dim=7)).eval()
    with pytest.raises(UserError, match="not both"):
        WorldModelEnv(
            tok, model, normalizer, str(store), state_key="observation.state", hold_state=True,
            state_predictor=predictor,
        )  # fmt: skip
    env = WorldModelEnv(
        tok, model, normalizer, str(store), state_key="observation.state", state_predictor=predictor,
        max_episode_steps=3,
    )  # fmt: skip
    check_env(env, skip_render_check=True)
    obs, info = env.reset(options={"episode": 1, "start": 2})
    assert info["state_predicted"] and not info["state_held"]
    norm = Normalizer.from_dict(normalizer)
    action = np.full(7, 0.5, np.float32)
    with torch.no_grad():
        expected = predictor(
            torch.from_numpy(norm.normalize("observation.state", obs["observation.state"])).float()[None],
            torch.from_numpy(norm.normalize("action", action)).float()[None],
        )[0].numpy()
    stepped, _, _, _, info = env.step(action)
    assert info["state_predicted"]
    np.testing.assert_allclose(
        stepped["observation.state"], norm.unnormalize("observation.state", expected), rtol=1e-5, atol=1e-5
    )
    assert not np.allclose(stepped["observation.state"], obs["observation.state"])


def test_compare_on_a_store(trained, tmp_path):
    store, run_dir, _ = trained
    cfg = compare.CompareWorldModelConfig(
        tokenizer=str(run_dir / "tokenizer"), dynamics=str(run_dir / "dynamics"), store=str(store),
        horizons=[1, 2, 8], clips_per_episode=2, sampler=FrameSamplerConfig(steps=1),
    )  # fmt: skip
    summary = compare.run(cfg, tmp_path).summary
    assert [r["horizon"] for r in summary["rows"]] == [1, 2, 8] and summary["clips"] == 10
    first = summary["rows"][0]
    assert first["repeat_last_psnr"] > summary["rows"][-1]["repeat_last_psnr"]  # the square moves away
    assert (tmp_path / "comparison.png").is_file()


def test_compare_records_in_mujoco(trained, tmp_path):
    _, run_dir, _ = trained
    from dreamrt.sim.env import EnvConfig

    cfg = compare.CompareWorldModelConfig(
        tokenizer=str(run_dir / "tokenizer"), dynamics=str(run_dir / "dynamics"), episodes=1, mode="single",
        env=EnvConfig(static_height=32, static_width=32, gripper_height=16, gripper_width=16),
        horizons=[1, 4], clips_per_episode=2, sampler=FrameSamplerConfig(steps=1), image=False,
    )  # fmt: skip
    summary = compare.run(cfg, tmp_path).summary
    assert summary["recorded"]["episodes_written"] == 1 and summary["clips"] == 2
    assert all(0 < r["model_psnr"] < 100 for r in summary["rows"])
    with pytest.raises(UserError, match="env.cameras"):
        compare.CompareWorldModelConfig(tokenizer="a", dynamics="b", env=EnvConfig(cameras=False))


def test_eval_data_of_chosen_episodes(trained):
    store, run_dir, _ = trained
    from dreamrt.world_models.quality import load_eval_data
    from dreamrt.world_models.tokenizer import load_tokenizer

    tok = load_tokenizer(run_dir / "tokenizer")
    _, normalizer = load_dynamics(run_dir / "dynamics")
    keys = dict(camera="observation.images.static", action_key="action", state_key="")
    full = load_eval_data(str(store), tok, normalizer, **keys)
    part = load_eval_data(str(store), tok, normalizer, episodes=[3, 1], **keys)
    rows = np.r_[90:120, 30:60]  # episodes 3 then 1, 30 frames each
    assert part.episode_ends.tolist() == [30, 60]
    assert torch.equal(part.images, full.images[rows]) and torch.equal(part.actions, full.actions[rows])
    torch.testing.assert_close(part.latents, full.latents[rows])
    with pytest.raises(UserError, match="not a non-empty list of episodes"):
        load_eval_data(str(store), tok, normalizer, episodes=[7], **keys)


def test_speculation_accepts_every_frame_of_a_stream_whose_actions_repeat(stream):
    from dreamrt.world_models.quality import timed_stream

    tok, model, data = stream
    # Context 3: the first speculation starts at row 2, the last of the first held block of 3;
    # after it (warm-up) every speculation starts on a block and all 3 frames match exactly.
    out = timed_stream(
        model, tok, data, 0, 9, FrameSamplerConfig(steps=1), context=3, speculate=3, tolerance=1e-6,
        warmup=1, action_hold=3,
    )  # fmt: skip
    assert out["frames_per_speculation"] == 3.0 and out["acceptance_rate"] == 1.0
    with pytest.raises(UserError, match="action_hold"):
        timed_stream(model, tok, data, 0, 4, FrameSamplerConfig(steps=1), context=3, action_hold=0)


@pytest.fixture(scope="module")
def distilled(trained, tmp_path_factory):
    """The trained fixture's dynamics distilled for a few steps by the job: (run dir, summary)."""
    from dreamrt.world_models.distill import WorldModelDistillConfig
    from dreamrt.world_models.distill import run as distill_run

    store, run_dir, _ = trained
    out = tmp_path_factory.mktemp("wmdistill") / "student"
    cfg = WorldModelDistillConfig(
        teacher=str(run_dir / "dynamics"),
        store=str(store),
        teacher_steps=4,
        clip_frames=5,
        max_targets=2,
        eval_clips=4,
        val_ratio=0.2,
        optim=OptimConfig(steps=4, batch_size=4, warmup_steps=1, log_every=2, save_every=2),
    )
    return out, distill_run(cfg, out).summary, cfg


def test_distill_world_model_job(trained, distilled):
    import dataclasses

    from dreamrt.world_models.distill import run as distill_run

    store, run_dir, _ = trained
    out, summary, cfg = distilled
    student, student_norm = load_dynamics(out)
    teacher, teacher_norm = load_dynamics(run_dir / "dynamics")
    assert student.config == teacher.config and student_norm == teacher_norm
    assert summary["steps"] == 4 and summary["tokenizer"] == str(run_dir / "tokenizer")
    assert set(summary["evaluation"]) == {
        "teacher",
        "student_1_step",
        "student_2_steps",
        "teacher_weights_1_step",
    }
    for figures in summary["evaluation"].values():
        assert figures["eval_psnr_db_relative"] > 0 and figures["eval_latent_mse"] >= 0
    moved = [
        not torch.equal(a, b) for a, b in zip(student.state_dict().values(), teacher.state_dict().values())
    ]
    assert any(moved)
    # Rerunning with more steps resumes from the last checkpoint.
    resumed = distill_run(
        dataclasses.replace(cfg, optim=dataclasses.replace(cfg.optim, steps=6)), out
    ).summary
    assert resumed["steps"] == 6
    # Another split would train on the teacher's held-out episodes; other teacher weights are refused.
    with pytest.raises(UserError, match="held out"):
        distill_run(dataclasses.replace(cfg, val_ratio=0.5), out.parent / "other_split")
    with pytest.raises(UserError, match="other weights"):
        distill_run(dataclasses.replace(cfg, teacher=str(out)), out)


def test_distill_on_the_students_own_rollouts(distilled, tmp_path, monkeypatch):
    import dataclasses

    import dreamrt.world_models.distill as distill_module
    from dreamrt.world_models.sampling import own_rollout_context

    calls = []

    def spy(model, latents, actions, states, first, sampler):
        calls.append((model.training, first, sampler.solver, sampler.steps))
        return own_rollout_context(model, latents, actions, states, first, sampler)

    monkeypatch.setattr(distill_module, "own_rollout_context", spy)
    cfg = dataclasses.replace(
        distilled[2],
        rollout_prob=1.0,
        optim=OptimConfig(steps=3, batch_size=4, warmup_steps=1, log_every=3, save_every=3),
    )
    summary = distill_module.run(cfg, tmp_path / "student").summary
    assert summary["steps"] == 3 and np.isfinite(summary["final_loss"])
    # The student (being trained) generated each batch's context in its own 1-step sampling.
    assert calls == [(True, calls[i][1], "x0", 1) for i in range(3)]
    assert all(1 <= first <= 2 for _, first, _, _ in calls)


def test_distill_direct_from_a_student(distilled, tmp_path, monkeypatch):
    """``student_init`` starts from an earlier student; ``direct_prob=1`` trains every batch with the
    direct temperature-0 loss; a start of another architecture is refused."""
    import dataclasses

    import dreamrt.world_models.distill as distill_module
    from dreamrt.world_models.dynamics import NextFrameDiT, save_dynamics

    out, _, base = distilled
    earlier, _ = load_dynamics(out)
    first_weights = []
    direct_loss = distill_module.direct_loss

    def spy(student, teacher, latents, cond, cfg, generator=None, context_latents=None):
        if not first_weights:
            first_weights.append(
                all(
                    torch.equal(a, b)
                    for a, b in zip(student.state_dict().values(), earlier.state_dict().values())
                )
            )
        return direct_loss(student, teacher, latents, cond, cfg, generator, context_latents)

    monkeypatch.setattr(distill_module, "direct_loss", spy)
    monkeypatch.setattr(distill_module, "consistency_loss", None)  # a CD batch would fail loudly
    cfg = dataclasses.replace(
        base,
        student_init=str(out),
        direct_prob=1.0,
        optim=OptimConfig(steps=2, batch_size=4, warmup_steps=1, log_every=2, save_every=2),
    )
    summary = distill_module.run(cfg, tmp_path / "student").summary
    assert first_weights == [True] and summary["student_init"] == str(out) and summary["steps"] == 2
    assert np.isfinite(summary["final_loss"])
    other = NextFrameDiT(dataclasses.replace(earlier.config, n_layer=earlier.config.n_layer + 1))
    save_dynamics(other, tmp_path / "other")
    with pytest.raises(UserError, match="another architecture"):
        distill_module.run(dataclasses.replace(cfg, student_init=str(tmp_path / "other")), tmp_path / "s2")


def test_bench_default_rows_with_a_student(trained, distilled):
    store, run_dir, _ = trained
    cfg = bench.BenchWorldModelConfig(
        tokenizer=str(run_dir / "tokenizer"),
        dynamics=str(run_dir / "dynamics"),
        student=str(distilled[0]),
        store=str(store),
        horizons=[1, 2],
        frames=8,
        warmup=1,
    )
    rows = bench.run(cfg).summary["rows"]
    by_name = {r["name"]: r for r in rows}
    assert {r["model"] for r in rows[:-2]} == {"teacher", "student"}
    undistilled = by_name["teacher weights, 1 step"]
    assert (undistilled["model"], undistilled["sampler"], undistilled["steps"]) == ("teacher", "x0", 1)
    one_step = [r for r in rows if (r["name"], r["steps"]) == ("student", 1)]
    assert [r["kv_cache"] for r in one_step] == [False, True]
    # The cache changes the speed, not the frames.
    assert one_step[0]["psnr_h1"] == pytest.approx(one_step[1]["psnr_h1"], abs=1e-3)
    held = by_name["student + spec., held actions"]
    assert held["action_hold"] == 4 and held["speculative"] == 4
    # Speedups compare with the same configuration without speculation, from the same run.
    assert held["speedup"] == pytest.approx(held["fps"] / by_name["student, held actions"]["fps"])
    assert by_name["student + speculation"]["speedup"] > 0
    # Held actions repeat exactly, so speculation keeps more frames than on the recorded stream.
    assert held["acceptance_rate"] > by_name["student + speculation"]["acceptance_rate"]
    for r in rows:
        assert r["psnr_plain_h1"] > 0
    with pytest.raises(UserError, match="student=RUN"):
        bench.BenchWorldModelConfig(
            tokenizer="t",
            dynamics="d",
            store="s",
            configs=[bench.BenchRowConfig("s", "x0", 1, model="student")],
        )


def test_bench_a_state_model_with_predicted_states(trained, tmp_path):
    """A state-conditioned model (started from the actions-only run) measured open loop with the states
    its predictor gives, against the recorded states."""
    store, run_dir, _ = trained
    common = dict(store=str(store), val_ratio=0.2, clip_frames=5, eval_clips=4)
    train_run(
        TrainWorldModelConfig(
            **common,
            stage="dynamics",
            tokenizer=str(run_dir / "tokenizer"),
            init=str(run_dir / "dynamics"),
            optim=OptimConfig(steps=2, batch_size=4, warmup_steps=1, save_every=2),
        ),
        tmp_path / "with_state",
    )
    summary = train_run(
        TrainWorldModelConfig(
            **common,
            stage="state",
            state_unroll=4,
            state_optim=OptimConfig(steps=5, batch_size=8, warmup_steps=1, save_every=5),
        ),
        tmp_path / "with_state",
    ).summary
    assert summary["state"]["steps"] == 5 and "state_mae_h4" in summary["state"]

    def quality(state_model: str) -> dict:
        return bench.run(
            bench.BenchWorldModelConfig(
                tokenizer=str(run_dir / "tokenizer"),
                dynamics=str(tmp_path / "with_state" / "dynamics"),
                state_model=state_model,
                store=str(store),
                configs=[bench.BenchRowConfig("teacher", "x0", 1)],
                horizons=[1, 4],
                frames=2,
                warmup=0,
            )
        ).summary

    env = WorldModelEnv.from_checkpoints(
        str(run_dir / "tokenizer"), str(tmp_path / "with_state" / "dynamics"), str(store),
        state_model=str(tmp_path / "with_state" / "state"),
    )  # fmt: skip
    obs, info = env.reset(seed=0)
    assert info["state_predicted"] and env.step(np.zeros(7, np.float32))[0]["observation.state"].shape == (
        15,
    )

    compared = compare.run(
        compare.CompareWorldModelConfig(
            tokenizer=str(run_dir / "tokenizer"), dynamics=str(tmp_path / "with_state" / "dynamics"),
            state_model=str(tmp_path / "with_state" / "state"), store=str(store), horizons=[1, 4],
            clips_per_episode=1, sampler=FrameSamplerConfig(steps=1),
        ),
        tmp_path / "compare",
    ).summary  # fmt: skip
    assert compared["states"] == "predicted" and (tmp_path / "compare" / "comparison.png").exists()

    predicted, recorded = quality(str(tmp_path / "with_state" / "state")), quality("")
    assert (predicted["states"], recorded["states"]) == ("predicted", "recorded")
    # The first generated frame is conditioned on the last real state either way; later ones differ.
    assert predicted["rows"][0]["psnr_h1"] == pytest.approx(recorded["rows"][0]["psnr_h1"], abs=1e-4)
    with pytest.raises(UserError, match="takes none"):
        bench.run(
            bench.BenchWorldModelConfig(
                tokenizer=str(run_dir / "tokenizer"),
                dynamics=str(run_dir / "dynamics"),
                state_model=str(tmp_path / "with_state" / "state"),
                store=str(store),
                configs=[bench.BenchRowConfig("teacher", "x0", 1)],
                horizons=[1],
                frames=2,
                warmup=0,
            )
        )


def test_horizon_quality_with_predicted_states(trained):
    """Generated frames are conditioned on the predictor's states, not the recorded ones."""
    from dreamrt.episodes import Normalizer, open_store
    from dreamrt.world_models.dynamics import NextFrameDiT
    from dreamrt.world_models.proprio import StatePredictor, StatePredictorConfig
    from dreamrt.world_models.quality import clip_starts, horizon_quality, load_eval_data
    from dreamrt.world_models.tokenizer import load_tokenizer

    store, run_dir, _ = trained
    tok = load_tokenizer(run_dir / "tokenizer")
    keys = {"action": "min_max", "observation.state": "min_max"}
    normalizer = Normalizer.from_stats(open_store(store).stats, keys).to_dict()
    data = load_eval_data(
        str(store), tok, normalizer, camera="observation.images.static", action_key="action",
        state_key="observation.state", episodes=[0, 1],
    )  # fmt: skip
    torch.manual_seed(0)
    tc = tok.config
    model = NextFrameDiT(
        preset("tiny", 7, 15, latent_channels=tc.latent_channels, latent_size=tc.latent_size)
    ).eval()
    predictor = StatePredictor(StatePredictorConfig(state_dim=15, action_dim=7)).eval()
    with torch.no_grad():
        for p in [*model.parameters(), *predictor.parameters()]:  # every input matters, states included
            p.normal_(0.0, 0.3)
    starts = clip_starts(data.episode_ends, np.arange(2), 3 + 4, 2, 0)

    def quality(state_predictor):
        return horizon_quality(
            model, tok, data, starts, FrameSamplerConfig(steps=1, solver="x0"), context=3, horizons=[1, 4],
            state_predictor=state_predictor,
        )  # fmt: skip

    predicted, recorded = quality(predictor), quality(None)
    assert predicted["model_plain_psnr_h1"] == pytest.approx(recorded["model_plain_psnr_h1"], abs=1e-5)
    assert abs(predicted["model_plain_psnr_h4"] - recorded["model_plain_psnr_h4"]) > 1e-3
