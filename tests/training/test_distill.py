"""`dreamrt distill`: a tiny DP-T teacher on a synthetic task, distilled into a 1-step consistency student.

The task: a point spirals inward, ``a = (-y - 0.3 x, x - 0.3 y)``, ``s' = s + 0.2 a``; the
action window is a smooth function of the observed state, so a good policy is nearly
deterministic and closeness to the teacher can be judged against the spread of actions.
"""

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from toy_reaching import make_store, toy_config

from dreamrt.episodes import SamplerConfig as WindowConfig
from dreamrt.episodes import create_store, open_store
from dreamrt.errors import UserError
from dreamrt.policies.consistency import ConsistencySampler
from dreamrt.policies.diffusion_policy import POLICY_KIND, load_diffusion_policy
from dreamrt.policies.encoders import ObsEncoderConfig
from dreamrt.policies.schedulers import DDIMSampler, SamplerConfig
from dreamrt.training.checkpoint import load_checkpoint, read_meta
from dreamrt.training.dataset import EpisodeDataset, EpisodeDatasetConfig
from dreamrt.training.distill import (
    ConsistencyDistillation,
    ConsistencyDistillationConfig,
    DistillConfig,
    TeacherReference,
    _check_store,
    build_student,
    normalized_actions,
    reference_windows,
    run,
    sample_normalized,
    warm_start_student,
)
from dreamrt.training.train_policy import DataConfig, PolicyModelConfig, TrainConfig, train
from dreamrt.training.trainer import TrainerConfig

STATE = "observation.state"


def _expert(s: np.ndarray) -> np.ndarray:
    return np.array([-s[1] - 0.3 * s[0], s[0] - 0.3 * s[1]])


def _spiral_store(path: Path, episodes: int = 24, length: int = 40, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    features = {STATE: {"dtype": "float32", "shape": [2]}, "action": {"dtype": "float32", "shape": [2]}}
    with create_store(path, features, fps=10.0) as writer:
        for _ in range(episodes):
            s = rng.uniform(-1.0, 1.0, 2)
            for _ in range(length):
                a = _expert(s)
                writer.add_frame({STATE: s.astype(np.float32), "action": a.astype(np.float32)}, task="spiral")
                s = s + 0.2 * a
            writer.end_episode()
    return path


def _windows(store: Path) -> EpisodeDataset:
    """The teacher's training windows (horizon 8, To 2)."""
    windows = WindowConfig(horizon=8, n_obs_steps=2, n_action_steps=4, obs_keys=[STATE])
    return EpisodeDataset(EpisodeDatasetConfig(path=str(store), sampler=windows))


def _trainer(**overrides) -> TrainerConfig:
    base = dict(
        batch_size=64,
        lr=1e-3,
        warmup_steps=50,
        weight_decay=0.0,
        encoder_weight_decay=0.0,
        log_every=25,
        val_every=0,
        eval_every=0,
        save_every=0,
        device="cpu",
        progress=False,
        plot=True,
    )
    base.update(overrides)
    return TrainerConfig(**base)


def _train_teacher(store: Path, out: Path, steps: int, seed: int = 0) -> Path:
    cfg = TrainConfig(
        dataset=DataConfig(path=str(store), val_ratio=0.0),
        policy_model=PolicyModelConfig(
            preset="tiny",
            horizon=8,
            n_obs_steps=2,
            n_action_steps=4,
            encoder=ObsEncoderConfig(lowdim_keys=[STATE], lowdim_dims=[2]),
        ),
        trainer=_trainer(steps=steps, plot=False, seed=seed),
    )
    train(cfg, out)
    return out


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # Tiny models on this 2-core machine: a second intra-op thread only spins (measured 7x slower
    # under load), so this module runs single-threaded and puts the setting back afterwards.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    return _spiral_store(tmp_path_factory.mktemp("distill") / "spiral.zarr")


@pytest.fixture(scope="module")
def teacher(store, tmp_path_factory) -> Path:
    return _train_teacher(store, tmp_path_factory.mktemp("distill") / "teacher", steps=800)


def _config(store: Path, teacher: Path, steps: int, **trainer) -> DistillConfig:
    return DistillConfig(
        teacher=str(teacher),
        dataset=DataConfig(path=str(store), val_ratio=0.0),
        steps=steps,
        num_steps=1,
        eval_windows=128,
        trainer=_trainer(**trainer),
    )


@pytest.fixture(scope="module")
def distilled(store, teacher, tmp_path_factory):
    out = tmp_path_factory.mktemp("distill") / "student"
    result = run(_config(store, teacher, steps=500, eval_every=250, save_every=250), out)
    return out, result.summary


# ---------------------------------------------------------------------------- the acceptance test


def test_one_step_student_stays_close_to_the_teacher(distilled, teacher, store):
    """Closeness on training windows, in normalised action units (mean distance between action vectors).

    'Close' means: as close to the teacher's samples (same x_T) as the teacher's own samples
    from other noise are, well below the spread of the actions, far below a random policy's
    distance, and far below the teacher's own one-step DDIM (what 1 step gives without distillation).
    """
    _, summary = distilled
    c = {k.removeprefix("closeness/"): v for k, v in summary.items() if k.startswith("closeness/")}
    err = c["student1_vs_teacher"]
    assert err < 0.4 * c["spread"], c
    assert err < 0.15 * c["random_vs_teacher"], c
    assert err < 1.2 * c["teacher_self"], c
    assert c["student1_vs_data"] < 2.0 * c["teacher_vs_data"], c

    policy = load_diffusion_policy(teacher)
    reference = TeacherReference(policy, reference_windows(_windows(store), 128), seed=0)
    teacher_one_step = sample_normalized(
        policy, DDIMSampler(policy.schedule, timesteps=[90]), reference.batch, 0
    )
    undistilled = float((teacher_one_step - reference.samples).pow(2).sum(-1).sqrt().mean())
    assert reference.metrics["teacher_self"] == pytest.approx(c["teacher_self"], rel=1e-5)
    assert err < 0.4 * undistilled, (err, undistilled)


def test_run_directory_and_checkpoint_kind(distilled, teacher):
    out, summary = distilled
    assert summary["steps"] == 500 and not summary["interrupted"]
    assert (out / "curves.png").stat().st_size > 0
    header = (out / "metrics.csv").read_text().splitlines()[0].split(",")
    assert {"loss", "lr", "eval/student1_vs_teacher", "eval/spread"} <= set(header)
    steps = sorted(p.name for p in (out / "checkpoints").iterdir() if p.name.startswith("step_"))
    assert steps == ["step_000250", "step_000500"]
    ckpt = load_checkpoint(out)
    assert ckpt.kind == POLICY_KIND and ckpt.step == 500
    assert ckpt.config["sampler"]["name"] == "consistency" and ckpt.config["sampler"]["num_steps"] == 1
    assert ckpt.config["noise"]["prediction_type"] == "sample"
    teacher_state = load_checkpoint(teacher).model_state
    assert ckpt.model_state.keys() == teacher_state.keys()  # the student's state is a plain DiffusionPolicy's
    recorded = json.loads((out / "teacher.json").read_text())
    assert recorded["model_sha256"] == read_meta(load_checkpoint(teacher).path).files["model.safetensors"]


def test_checkpoint_round_trip_same_actions_for_the_same_seed(distilled):
    out, _ = distilled
    a, b = load_diffusion_policy(out), load_diffusion_policy(out)
    assert isinstance(a.sampler, ConsistencySampler) and a.sampler.num_steps == 1
    previous = np.array([0.3, -0.5])
    state = previous + 0.2 * _expert(previous)  # two consecutive observations along a spiral
    history = [{STATE: previous.astype(np.float32)}, {STATE: state.astype(np.float32)}]

    def act(policy, seed):
        policy.reset(seed=seed)
        policy.act(history[0])
        return policy.act(history[1])

    chunk_a, chunk_b = act(a, 7), act(b, 7)
    np.testing.assert_array_equal(chunk_a.actions, chunk_b.actions)
    assert chunk_a.info["sampler"] == "consistency" and chunk_a.info["sampler_steps"] == 1
    assert not np.array_equal(act(b, 8).actions, chunk_a.actions)  # the seed matters (x_T differs)
    # For scale: the first action is the expert's at this state, to within a fraction of its size.
    expert = _expert(state)  # about (0.30, 0.50)
    assert np.linalg.norm(chunk_a.actions[0] - expert) < 0.5 * np.linalg.norm(expert), (
        chunk_a.actions[0],
        expert,
    )

    three = load_diffusion_policy(out, sampler=SamplerConfig(name="consistency", num_steps=3))
    assert three.sampler.timesteps == [90, 60, 30]
    chunk_3 = act(three, 7)
    assert chunk_3.info["sampler_steps"] == 3
    assert np.linalg.norm(chunk_3.actions[0] - expert) < 0.5 * np.linalg.norm(expert), (
        chunk_3.actions[0],
        expert,
    )


def test_resume_continues_exactly(store, teacher, tmp_path):
    full = tmp_path / "full"
    run(_config(store, teacher, steps=4, save_every=2, keep_last=None, warmup_steps=1), full)
    resumed = tmp_path / "resumed"
    cfg = replace(
        _config(store, teacher, steps=4, save_every=2, keep_last=None, warmup_steps=1),
        resume=str(full / "checkpoints" / "step_000002"),
    )
    run(cfg, resumed)
    a = load_file(full / "checkpoints" / "step_000004" / "model.safetensors")
    b = load_file(resumed / "checkpoints" / "step_000004" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not all(
        torch.equal(a[k], v)
        for k, v in load_file(full / "checkpoints" / "step_000002" / "model.safetensors").items()
    )


def test_resume_refuses_another_teacher(store, teacher, tmp_path):
    out = tmp_path / "run"
    run(_config(store, teacher, steps=2, warmup_steps=1), out)
    other = _train_teacher(store, tmp_path / "other_teacher", steps=2, seed=1)
    cfg = replace(_config(store, other, steps=4, warmup_steps=1), resume=str(out))
    with pytest.raises(UserError, match="other weights"):
        run(cfg, out)


# ---------------------------------------------------------------------------- the objective


def test_objective_state_is_the_students_and_the_teacher_stays_frozen(teacher, store):
    policy = load_diffusion_policy(teacher)
    student = build_student(policy, num_steps=2)
    assert student.sampler.timesteps == [90, 45] and student.config.noise.prediction_type == "sample"
    objective = ConsistencyDistillation(student, policy, ConsistencyDistillationConfig())
    assert objective.state_dict().keys() == student.state_dict().keys()
    objective.train()
    assert not objective.teacher.training and objective.student.training

    batch = reference_windows(_windows(store), 16)
    torch.manual_seed(0)
    loss = objective(batch)
    loss.backward()
    assert loss.ndim == 0 and float(loss.detach()) > 0
    assert all(p.grad is None for p in policy.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in student.parameters())

    # The teacher step is the DDIM sampler's step (eta 0), per sample.
    x0 = normalized_actions(policy, batch)
    t, t_prev = torch.tensor([90, 35, 5, 0]), torch.tensor([80, 25, -1, -1])
    x_t = policy.schedule.add_noise(x0[:4], torch.randn_like(x0[:4]), t)
    with torch.no_grad():
        features = policy.encode_observations({STATE: batch[STATE][:4]})
        got = objective.teacher_ddim_step(x_t, t, t_prev, features)
        for i in range(4):
            ddim = DDIMSampler(
                policy.schedule, timesteps=[int(t[i])] + ([int(t_prev[i])] if t_prev[i] >= 0 else [])
            )
            out = policy.model(x_t[i : i + 1], t[i : i + 1], features[i : i + 1])
            expected = ddim.step(out, int(t[i]), x_t[i : i + 1])
            torch.testing.assert_close(got[i : i + 1], expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(teacher="???"), "needs a teacher"),
        (dict(num_steps=0), "num_steps"),
        (dict(steps=0), "steps must be an int >= 1"),
        (dict(trainer=TrainerConfig(steps=50)), "takes its length from steps=N"),
    ],
)
def test_bad_config_is_a_user_error(change, message, store, teacher, tmp_path):
    with pytest.raises(UserError, match=message):
        cfg = replace(_config(store, teacher, steps=2), **change)
        run(cfg, tmp_path / "x")


def test_store_without_the_teachers_inputs_is_refused(teacher, tmp_path):
    path = tmp_path / "other.zarr"
    features = {
        "observation.other": {"dtype": "float32", "shape": [2]},
        "action": {"dtype": "float32", "shape": [2]},
    }
    with create_store(path, features, fps=10.0) as writer:
        for i in range(20):
            writer.add_frame(
                {"observation.other": np.zeros(2, np.float32), "action": np.full(2, i / 20, np.float32)},
                task="x",
            )
        writer.end_episode()
    with pytest.raises(UserError, match="observation.state"):
        run(_config(path, teacher, steps=2), tmp_path / "run")
    with pytest.raises(UserError, match="solver_step"):
        ConsistencyDistillationConfig(solver_step=0)
    with pytest.raises(UserError, match="loss"):
        ConsistencyDistillationConfig(loss="l1")


def _store_of_tasks(path: Path, tasks: tuple[str, ...]) -> Path:
    """One 10-frame episode per task, in this order (so task_index follows it)."""
    features = {STATE: {"dtype": "float32", "shape": [2]}, "action": {"dtype": "float32", "shape": [2]}}
    with create_store(path, features, fps=30) as writer:
        for task in tasks:
            for _ in range(10):
                writer.add_frame(
                    {STATE: np.zeros(2, np.float32), "action": np.zeros(2, np.float32)}, task=task
                )
            writer.end_episode()
    return path


def test_distilling_on_another_recording_translates_its_task_indices(tmp_path):
    both = make_store(tmp_path / "both.zarr", episodes=4, length=10, language=True)  # "go left", "go right"
    cfg = toy_config(both, language=True, steps=2, val_every=0, save_every=0)
    cfg.dataset.val_ratio = 0.0
    teacher_path = train(cfg, tmp_path / "teacher").checkpoint
    teacher = load_diffusion_policy(teacher_path)
    rows = {text: row for row, text in enumerate(teacher.config.instructions)}
    # The teacher's store, and that store before the second task was appended: indices as they are.
    assert _check_store(open_store(both), teacher) is None
    left = make_store(tmp_path / "left.zarr", episodes=1, length=10, language=True)
    assert _check_store(open_store(left), teacher) is None

    # Another recording of the same tasks met them in the other order: task_index 0 is "go right".
    swapped = _store_of_tasks(tmp_path / "swapped.zarr", ("go right", "go left"))
    index_map = _check_store(open_store(swapped), teacher)
    assert index_map.tolist() == [rows["go right"], rows["go left"]]
    windows = WindowConfig(horizon=8, n_obs_steps=2, n_action_steps=4, obs_keys=[STATE, "task_index"])
    recorded = ("go right", "go left")  # episode e holds recorded[e]
    for cache in ("lowdim", "none"):  # "none" reads the state from disk, the translated indices from memory
        data = EpisodeDataset(
            EpisodeDatasetConfig(path=str(swapped), sampler=windows, val_ratio=0.5, seed=0, cache=cache),
            task_index_map=index_map,
        )
        for split in (data, data.split_dataset("val")):  # one episode each
            (episode,) = split.episode_mask.nonzero()[0]
            by_window = {int(split[i]["task_index"][-1]) for i in range(len(split))}
            assert by_window == {rows[recorded[episode]]}
            if cache == "lowdim":
                gathered = split.device_windows("cpu").batch(torch.arange(len(split)))["task_index"]
                assert set(gathered.long().flatten().tolist()) == {rows[recorded[episode]]}
    run(_config(swapped, teacher_path, steps=2, batch_size=8), tmp_path / "student")
    assert load_diffusion_policy(tmp_path / "student").config.instructions == teacher.config.instructions

    # An instruction the teacher never saw has no row in its table.
    unknown = _store_of_tasks(tmp_path / "unknown.zarr", ("go left", "go up"))
    with pytest.raises(UserError, match="1 instruction.*not trained on.*go up"):
        _check_store(open_store(unknown), teacher)


# ---------------------------------------------------------------------------- warm start


def test_student_init_starts_from_the_earlier_student(distilled, teacher, store, tmp_path):
    """student_init= loads an earlier student's weights: a short run from it stays as close to the
    teacher as that student, where the same short run from the teacher's weights is far off."""
    out, summary = distilled
    student = build_student(load_diffusion_policy(teacher), num_steps=1)
    warm_start_student(student, str(out))
    earlier = load_diffusion_policy(out)
    for name, value in earlier.state_dict().items():
        torch.testing.assert_close(student.state_dict()[name], value, rtol=0, atol=0)

    short = dict(steps=20, lr=1e-5, warmup_steps=1)
    warm = run(replace(_config(store, teacher, **short), student_init=str(out)), tmp_path / "warm").summary
    cold = run(_config(store, teacher, **short), tmp_path / "cold").summary
    key = "closeness/student1_vs_teacher"
    assert warm[key] < 1.3 * summary[key], (warm[key], summary[key])
    assert warm[key] < 0.5 * cold[key], (warm[key], cold[key])


def test_student_init_refuses_a_checkpoint_that_is_not_a_student(store, teacher, tmp_path):
    with pytest.raises(UserError, match="not a consistency student"):
        run(replace(_config(store, teacher, steps=2), student_init=str(teacher)), tmp_path / "x")
    assert not (tmp_path / "x" / "checkpoints").exists()  # refused before anything was written
