"""`dreamrt bench policy` on tiny random DP-T checkpoints: row plan, latency rows, success rollouts."""

import json

import numpy as np
import pytest
from test_onnx_backend import ACTION, ENV, INSTRUCTIONS, STATE, make_policy

from dreamrt.errors import UserError
from dreamrt.policies import schedulers
from dreamrt.policies.diffusion_policy import save_diffusion_policy
from dreamrt.policies.schedulers import SamplerConfig
from dreamrt.runtime.bench_policy import (
    BenchPolicyConfig,
    BenchPolicySection,
    parse_sampler,
    plan_rows,
    resolve_checkpoints,
    run,
    single_task_specs,
    store_observations,
)

ROW_KEYS = {"sampler", "steps", "cache", "backend", "latency_ms_p50", "latency_ms_p99", "success"}


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    policy = make_policy(sampler=SamplerConfig(name="ddim", num_steps=4), p_drop=0.0)
    return save_diffusion_policy(policy, tmp_path_factory.mktemp("teacher") / "ckpt")


def quick(path, **overrides) -> BenchPolicyConfig:
    settings = dict(
        policy=BenchPolicySection(path=str(path)),
        repeats=3,
        warmup=1,
        observations=2,
        num_workers=0,
        progress=False,
    )
    return BenchPolicyConfig(**{**settings, **overrides})


def test_latency_rows_for_samplers_caches_and_backends(teacher, tmp_path, capsys):
    cfg = quick(
        teacher,
        samplers=["ddpm-12", "ddim-4", "consistency-1"],
        caches=["none", "bac", "uniform"],
        cache_updates=4,
        success=False,
    )
    summary = run(cfg, tmp_path).summary
    rows = summary["rows"]
    assert [(r["sampler"], r["steps"], r["cache"], r["backend"]) for r in rows] == [
        (s, k, c, b)
        for s, k in (("ddpm", 12), ("ddim", 4))
        for c in ("none", "bac", "uniform")
        for b in ("torch", "onnxruntime")
    ]
    for r in rows:
        assert ROW_KEYS <= set(r) and r["success"] is None
        assert 0 < r["latency_ms_p50"] <= r["latency_ms_p99"] and r["timed_calls"] == 3
        assert 0 < r["encoder_ms_p50"] < r["latency_ms_p50"]
        if r["cache"] == "none":
            assert r["action_diff_vs_torch"] < 1e-4  # onnxruntime: the same chunk as torch
        else:
            assert r["compute_fraction"] < 1.0
    # Caching is approximate, and both backends approximate alike.
    by = {(r["sampler"], r["cache"], r["backend"]): r for r in rows}
    assert by[("ddpm", "uniform", "torch")]["action_diff_vs_torch"] > 1e-4
    for cache in ("bac", "uniform"):
        a, b = by[("ddpm", cache, "torch")], by[("ddpm", cache, "onnxruntime")]
        assert abs(a["action_diff_vs_torch"] - b["action_diff_vs_torch"]) < 1e-4
    assert by[("ddpm", "bac", "torch")]["schedule"].startswith("calibrated here")
    assert by[("ddim", "uniform", "onnxruntime")]["compute_fraction"] == 0.5  # 2 of 4 steps
    assert {s["sampler"] for s in summary["skipped"]} == {"consistency"} and len(summary["skipped"]) == 6
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved == json.loads(json.dumps(summary))
    assert sorted(p.name for p in tmp_path.glob("bac_schedule_*.json")) == [
        "bac_schedule_ddim-4.json",
        "bac_schedule_ddpm-12.json",
    ]
    out = capsys.readouterr().out
    assert "p50 ms" in out and "skipped consistency-1" in out


def test_success_rollouts_fill_the_rows(teacher, tmp_path):
    tasks = ["open_drawer", "turn_on_led"]
    cfg = quick(
        teacher,
        samplers=["ddim-3"],
        caches=["none"],
        tasks=tasks,
        episodes_per_task=2,
        chains=1,
        max_steps_per_subtask=12,
        dataset=str(_store(tmp_path / "demo.zarr")),
    )
    summary = run(cfg, None).summary
    rows = summary["rows"]
    assert [r["backend"] for r in rows] == ["torch", "onnxruntime"]
    for r in rows:
        assert ROW_KEYS | {"avg_len", "per_task", "episodes"} <= set(r)
        assert r["episodes"] == 4 and sorted(r["per_task"]) == sorted(tasks) and r["chains"] == 1
        assert 0.0 <= r["success"] <= 1.0 and r["success"] == pytest.approx(
            np.mean(list(r["per_task"].values()))
        )
        assert 0.0 <= r["avg_len"] <= 5.0
        assert r["success_backend"] == "onnxruntime"  # rolled out once, on the fast backend
    assert summary["observations"].endswith("demo.zarr")
    assert summary["evaluation"] == {
        "tasks": 2,
        "episodes_per_task": 2,
        "chains": 1,
        "max_steps_per_subtask": 12,
    }


def _store(path):
    from dreamrt.episodes import create_store

    features = {
        "observation.state": {"dtype": "float32", "shape": [STATE]},
        "observation.environment_state": {"dtype": "float32", "shape": [ENV]},
        "action": {"dtype": "float32", "shape": [ACTION]},
    }
    g = np.random.default_rng(0)
    with create_store(path, features, fps=30) as writer:
        for e in range(2):
            for _ in range(5):
                frame = {k: g.uniform(-1, 1, f["shape"]).astype(np.float32) for k, f in features.items()}
                writer.add_frame(frame, task=INSTRUCTIONS[e])
            writer.end_episode()
    return path


def test_store_observations_spread_over_the_store(teacher, tmp_path):
    from dreamrt.policies.factory import load_policy

    path = _store(tmp_path / "s.zarr")
    observations = store_observations(str(path), load_policy(str(teacher)), 3)
    assert len(observations) == 3 and [o["task"] for o in observations] == [INSTRUCTIONS[0], INSTRUCTIONS[0], INSTRUCTIONS[1]]  # fmt: skip
    assert observations[0]["observation.state"].shape == (STATE,)


def test_single_task_specs_are_the_evaluations_episodes():
    from dreamrt.sim import protocol
    from dreamrt.sim.evaluate import task_specs

    specs = single_task_specs(["open_drawer", "lift_red_block_table"], 3, seed=1)
    assert sorted(s.tasks[0] for s in specs) == ["lift_red_block_table"] * 3 + ["open_drawer"] * 3
    assert [s.index for s in specs] == list(range(6))
    assert all(protocol.precondition_holds(s.tasks[0], s.start_state) for s in specs)
    full = {(s.tasks[0], s.env_seed): s.start_state for s in task_specs(3, 1, 0)}
    assert all(full[(s.tasks[0], s.env_seed)] == s.start_state for s in specs)
    assert len({s.env_seed for s in specs}) == 6


def test_plan_and_config_errors(teacher, tmp_path):
    assert parse_sampler("ddpm-100") == ("ddpm", 100) and parse_sampler("ddim") == ("ddim", None)
    for bad in ("ddpm100", "ddpm-0", "foo-3", "ddim-x"):
        with pytest.raises(UserError, match="NAME-STEPS"):
            parse_sampler(bad)
    with pytest.raises(UserError, match="Did you mean 'bac'"):
        quick(teacher, caches=["bca"])
    with pytest.raises(UserError, match="needs a checkpoint"):
        BenchPolicyConfig()
    with pytest.raises(UserError, match="Unknown task"):
        quick(teacher, tasks=["open_drawr"])
    with pytest.raises(UserError, match="not a `dreamrt distill` student"):
        resolve_checkpoints(quick(teacher, student=str(teacher)))
    cfg = quick(teacher, samplers=["consistency-1", "ddim-1"], caches=["none", "bac"])
    t, s, _ = resolve_checkpoints(cfg)
    rows, skipped = plan_rows(cfg, t, s)
    assert [(r.sampler, r.cache) for r in rows] == [("ddim", "none"), ("ddim", "none")]
    assert {x["reason"] for x in skipped} == {
        "no consistency student (student=PATH)",
        "caching applies to multi-step DDPM / DDIM samplers",
    }
    with pytest.raises(UserError, match="No benchmark row"):
        run(quick(teacher, samplers=["consistency-1"], success=False), None)


def test_bench_config_composes_from_its_yaml():
    from dreamrt.cli.commands import by_name
    from dreamrt.cli.main import compose

    command = by_name()["bench policy"]
    cfg, _ = compose(command, ["policy.path=/ckpt", "samplers=[ddim-10]", "success=false", "student=/s"])
    assert (cfg.policy.path, cfg.samplers, cfg.success, cfg.student) == ("/ckpt", ["ddim-10"], False, "/s")
    assert cfg.backends == ["torch", "onnxruntime"] and cfg.env.scene == "D"


@pytest.mark.skipif(
    "consistency" not in schedulers.SAMPLERS, reason="SamplerConfig does not know the consistency sampler yet"
)
def test_student_rows_and_the_teacher_from_the_students_run(teacher, tmp_path):
    from dreamrt.policies.diffusion_policy import load_diffusion_policy
    from dreamrt.training.distill import build_student

    student = build_student(load_diffusion_policy(teacher), 1).eval()
    ckpt = save_diffusion_policy(student, tmp_path / "run" / "checkpoints" / "step_000010")
    (tmp_path / "run" / "teacher.json").write_text(json.dumps({"path": str(teacher)}))
    cfg = quick(ckpt, samplers=["ddim-4", "consistency-1", "consistency-3"], caches=["none"], success=False)
    t, s, notes = resolve_checkpoints(cfg)
    assert (t, s) == (teacher, ckpt) and "teacher.json" in notes[0]
    rows = run(cfg, None).summary["rows"]
    assert [(r["sampler"], r["steps"], r["role"]) for r in rows[::2]] == [
        ("ddim", 4, "teacher"),
        ("consistency", 1, "student"),
        ("consistency", 3, "student"),
    ]
    assert all(r["action_diff_vs_torch"] < 1e-4 for r in rows)
