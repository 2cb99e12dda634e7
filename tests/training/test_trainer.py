"""The trainer and `dreamrt train`: artefacts, learning, Ctrl-C, exact resume, schedule, data order, EMA."""

import copy
import csv
import math
import signal

import numpy as np
import pytest
import torch
from sim_demos import record_demos
from toy_reaching import closed_loop, make_store, toy_config

from dreamrt.errors import UserError
from dreamrt.policies.diffusion_policy import POLICY_KIND, load_diffusion_policy
from dreamrt.policies.encoders import ObsEncoderConfig
from dreamrt.training.checkpoint import latest_checkpoint, load_checkpoint, load_training_state
from dreamrt.training.ema import EMA, EMAConfig, ema_decay
from dreamrt.training.train_policy import TrainConfig, run, train
from dreamrt.training.trainer import EpochBatchSampler, MetricsLog, make_adamw, warmup_cosine


@pytest.fixture(autouse=True)
def one_thread():
    # Tiny models run fastest on one intra-op thread, and much faster when the cores are shared.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def state_store(tmp_path_factory):
    return make_store(tmp_path_factory.mktemp("toy") / "state.zarr", episodes=16, length=20)


@pytest.fixture(scope="module")
def language_store(tmp_path_factory):
    return make_store(tmp_path_factory.mktemp("toy") / "language.zarr", episodes=40, length=30, language=True)


def read_metrics(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_run_writes_checkpoints_metrics_and_curves(state_store, tmp_path):
    cfg = toy_config(state_store, steps=30, save_every=10, keep_last=2, progress=True)
    result = run(cfg, tmp_path)
    assert result.exit_code == 0
    s = result.summary
    assert s["steps"] == 30 and not s["interrupted"] and s["checkpoint"].endswith("step_000030")
    assert s["samples_per_s"] > 0 and math.isfinite(s["loss"]) and math.isfinite(s["val_loss"])
    steps = sorted(p.name for p in (tmp_path / "checkpoints").glob("step_*"))
    assert steps == ["step_000020", "step_000030"]  # keep_last=2
    assert latest_checkpoint(tmp_path).name == "step_000030"
    rows = read_metrics(tmp_path / "metrics.csv")
    assert [int(r["step"]) for r in rows] == list(range(4, 31, 4)) + [30]
    assert {"loss", "lr", "samples_per_s", "grad_norm", "val_loss"} <= set(rows[0])
    assert [r["step"] for r in rows if r["val_loss"]] == ["8", "16", "24"]
    assert (tmp_path / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    ckpt = load_checkpoint(tmp_path)
    assert ckpt.kind == POLICY_KIND and ckpt.step == 30
    assert ckpt.config["model"]["action_dim"] == 2 and ckpt.config["rate_hz"] == 30.0
    policy = load_diffusion_policy(tmp_path)
    policy.reset(0)
    obs = {
        "observation.state": np.zeros(2, np.float32),
        "observation.environment_state": np.zeros(2, np.float32),
    }
    assert policy.act(obs).actions.shape == (4, 2)


def test_tf32_is_a_cuda_setting_that_a_cpu_run_leaves_alone(state_store, tmp_path):
    flags = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    try:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
        run(toy_config(state_store, steps=2, tf32=True, val_every=0, save_every=0), tmp_path / "cpu")
        assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == (False, False)
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = flags


def test_training_steps_with_fused_adamw_that_matches_the_per_tensor_loop(state_store, tmp_path):
    train(toy_config(state_store, steps=2, val_every=0, save_every=0), tmp_path)
    assert all(group["fused"] for group in load_training_state(tmp_path).optimizer["param_groups"])

    torch.manual_seed(0)
    fused_model = torch.nn.Sequential(torch.nn.Linear(5, 16), torch.nn.GELU(), torch.nn.Linear(16, 3))
    loop_model, start = copy.deepcopy(fused_model), copy.deepcopy(fused_model)
    hyper = dict(lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=1e-3)
    fused = make_adamw(fused_model.parameters(), torch.device("cpu"), **hyper)
    loop = torch.optim.AdamW(loop_model.parameters(), foreach=False, **hyper)
    x, y = torch.randn(32, 5), torch.randn(32, 3)
    for _ in range(20):
        for model, optimizer in ((fused_model, fused), (loop_model, loop)):
            optimizer.zero_grad()
            torch.nn.functional.mse_loss(model(x), y).backward()
            optimizer.step()
    for a, b in zip(fused_model.parameters(), loop_model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert (fused_model[0].weight - start[0].weight).abs().max() > 0.05  # 20 steps of lr 1e-2 moved it


def test_trainer_compile_runs_the_loss_under_torch_compile(state_store, tmp_path):
    from torch._dynamo.utils import counters

    counters.clear()
    result = train(toy_config(state_store, steps=3, val_every=0, save_every=0, compile="default"), tmp_path)
    assert result.step == 3 and math.isfinite(result.metrics["loss"])
    assert counters["stats"]["unique_graphs"] > 0  # dynamo captured the loss computation
    assert load_checkpoint(tmp_path).step == 3  # the saved weights are the plain model's
    with pytest.raises(UserError, match="trainer.compile"):
        toy_config(state_store, compile="max")


def test_checkpoint_holds_ema_weights_and_raw_weights_in_training_state(state_store, tmp_path):
    result = train(toy_config(state_store, steps=12, save_every=0), tmp_path)
    ckpt = load_checkpoint(tmp_path)
    ema, raw = result.ema_model.state_dict(), result.model.state_dict()
    assert all(torch.equal(ckpt.model_state[k], ema[k]) for k in ema)
    saved_raw = load_training_state(tmp_path).scheduler["raw_weights"]
    assert all(torch.equal(saved_raw[k], raw[k]) for k in raw)
    assert not torch.equal(ema["model.out.weight"], raw["model.out.weight"])  # really two sets of weights


def test_policy_learns_toy_reaching_from_language(language_store, tmp_path):
    cfg = toy_config(
        language_store,
        language=True,
        p_drop=0.0,
        steps=400,
        batch_size=64,
        log_every=25,
        val_every=100,
        val_batches=4,
        save_every=0,
    )
    result = run(cfg, tmp_path)
    rows = read_metrics(tmp_path / "metrics.csv")
    losses = [float(r["loss"]) for r in rows]
    assert losses[-1] < losses[0] / 4, losses
    vals = [float(r["val_loss"]) for r in rows if r["val_loss"]]
    assert vals[-1] < vals[0], vals
    assert result.summary["loss"] < 0.1

    policy = load_diffusion_policy(tmp_path)

    def act(obs, episode):
        if episode != getattr(act, "episode", None):
            act.episode = episode
            policy.reset(episode)
        return policy.act(obs).actions

    rng = np.random.default_rng(0)
    mse, dist = closed_loop(act, policy.observe, language=True)
    random_mse, random_dist = closed_loop(lambda obs, e: rng.uniform(-1, 1, (4, 2)), language=True)
    # The two goals are opposite: ignoring the instruction leaves the point ~0.6 from its goal.
    assert dist < 0.2 and random_dist > 0.5, (dist, random_dist)
    assert mse < 0.1 * random_mse, (mse, random_mse)


def test_ctrl_c_saves_and_resume_is_bitwise_exact(state_store, tmp_path):
    straight = train(toy_config(state_store), tmp_path / "straight")
    assert straight.step == 24

    def press_ctrl_c(policy):
        signal.raise_signal(signal.SIGINT)  # what a terminal's Ctrl-C delivers
        return {"pressed": 1.0}

    # What was installed before: Python's default handler, or SIG_IGN when the suite runs as a
    # background job (a shell starts those with SIGINT ignored).
    before = signal.getsignal(signal.SIGINT)
    interrupted = train(toy_config(state_store, eval_every=12), tmp_path / "split", evaluate=press_ctrl_c)
    assert interrupted.interrupted and interrupted.step == 12
    assert latest_checkpoint(tmp_path / "split").name == "step_000012"
    assert signal.getsignal(signal.SIGINT) is before  # the handler is restored

    # Neither the DataLoader (with workers) nor gathering on the device changes the batches: the
    # straight run gathered them on the device, the resumed half loads them through workers.
    resumed_cfg = toy_config(state_store, num_workers=2, data_on_device="off")
    resumed_cfg.resume = str(tmp_path / "split")
    resumed = train(resumed_cfg, tmp_path / "split")
    assert resumed.step == 24 and not resumed.interrupted

    a, b = load_checkpoint(tmp_path / "straight"), load_checkpoint(tmp_path / "split")
    assert a.step == b.step == 24
    assert a.model_state.keys() == b.model_state.keys()
    for k in a.model_state:
        assert torch.equal(a.model_state[k], b.model_state[k]), k  # EMA weights
    sa, sb = load_training_state(a.path), load_training_state(b.path)
    for k, v in sa.scheduler["raw_weights"].items():
        assert torch.equal(v, sb.scheduler["raw_weights"][k]), k
    for pid, state in sa.optimizer["state"].items():
        for name, t in state.items():
            assert torch.equal(t, sb.optimizer["state"][pid][name]), (pid, name)
    assert sa.scheduler["lr_schedule"] == sb.scheduler["lr_schedule"]
    # The logged losses agree too, including the eval row the interrupted run wrote at step 12.
    ra, rb = (
        read_metrics(tmp_path / "straight" / "metrics.csv"),
        read_metrics(tmp_path / "split" / "metrics.csv"),
    )
    assert [(r["step"], r["loss"], r["val_loss"]) for r in ra] == [
        (r["step"], r["loss"], r["val_loss"]) for r in rb
    ]
    assert [r["eval/pressed"] for r in rb if r["eval/pressed"]] == ["1"]


_SIGTERM_TO_THE_GROUP = """
import multiprocessing, os, signal, sys, time
sys.path.insert(0, sys.argv[1])
from toy_reaching import toy_config
from dreamrt.training.train_policy import train

def sigterm_to_my_process_group(policy):  # what `timeout -s TERM` or a batch scheduler does
    os.killpg(0, signal.SIGTERM)
    time.sleep(1.0)  # time for a worker that took the signal to die
    workers = multiprocessing.active_children()
    print("workers alive", len(workers), all(w.is_alive() for w in workers), flush=True)
    return {}

result = train(toy_config(sys.argv[2], eval_every=6, num_workers=2, data_on_device="off"), sys.argv[3], evaluate=sigterm_to_my_process_group)
print("interrupted", result.interrupted, "step", result.step)
"""


def test_sigterm_to_the_process_group_saves_a_run_with_dataloader_workers(state_store, tmp_path):
    # A worker killed by the group's signal can crash the loop before it saves (seen under
    # `timeout` on a GPU machine): workers leave the group, so only the main process hears it.
    import subprocess
    import sys
    from pathlib import Path

    here = str(Path(__file__).parent)
    run = subprocess.run(
        [sys.executable, "-c", _SIGTERM_TO_THE_GROUP, here, str(state_store), str(tmp_path / "run")],
        capture_output=True,
        text=True,
        timeout=300,
        start_new_session=True,  # its own process group: the signal must not reach pytest
    )
    assert run.returncode == 0, run.stderr[-2000:]
    assert "workers alive 2 True" in run.stdout, run.stdout
    assert "interrupted True step 6" in run.stdout
    assert latest_checkpoint(tmp_path / "run").name == "step_000006"


def test_resume_refuses_another_model_config(state_store, tmp_path):
    train(toy_config(state_store, steps=4, save_every=0), tmp_path)
    cfg = toy_config(state_store, steps=8)
    cfg.policy_model.n_layer = 3
    cfg.resume = str(tmp_path)
    with pytest.raises(UserError, match="model.n_layer"):
        train(cfg, tmp_path / "other")
    with pytest.raises(UserError, match="already holds"):  # a fresh run never mixes into an old one
        train(toy_config(state_store, steps=4), tmp_path)


def test_init_from_warm_starts_the_weights_with_a_fresh_optimizer(state_store, tmp_path):
    train(toy_config(state_store, steps=12, save_every=0), tmp_path / "first")
    first = load_checkpoint(tmp_path / "first")
    cfg = toy_config(state_store, steps=4, lr=1e-9, save_every=0, val_every=0)  # lr ~0: weights barely move
    cfg.init_from = str(tmp_path / "first")
    train(cfg, tmp_path / "second")
    second = load_checkpoint(tmp_path / "second")
    assert second.step == 4  # a new run, counted from step 0
    assert second.normalizer == first.normalizer
    for key, value in first.model_state.items():
        torch.testing.assert_close(second.model_state[key], value, atol=1e-6, rtol=0)

    cfg.resume = str(tmp_path / "first")
    with pytest.raises(UserError, match="not both"):
        train(cfg, tmp_path / "third")
    other = toy_config(state_store, steps=4)
    other.policy_model.n_emb = 48
    other.init_from = str(tmp_path / "first")
    with pytest.raises(UserError, match="shape mismatches"):
        train(other, tmp_path / "fourth")


def test_init_from_may_add_encoder_inputs_and_starts_from_the_checkpoints_behaviour(state_store, tmp_path):
    def with_keys(keys, **trainer):
        cfg = toy_config(state_store, **trainer)
        cfg.policy_model.encoder = ObsEncoderConfig(lowdim_keys=keys, lowdim_dims=[2] * len(keys))
        return cfg

    train(with_keys(["observation.state"], steps=12, save_every=0), tmp_path / "first")
    wider = with_keys(["observation.state", "observation.environment_state"], steps=4, lr=1e-9, val_every=0)
    wider.init_from = str(tmp_path / "first")
    train(wider, tmp_path / "wider")

    first, second = load_checkpoint(tmp_path / "first"), load_checkpoint(tmp_path / "wider")
    # The checkpoint's scaling is kept; the added key gets this store's.
    assert (
        second.normalizer["features"]["observation.state"]
        == first.normalizer["features"]["observation.state"]
    )
    assert "observation.environment_state" in second.normalizer["features"]
    reader = second.model_state["model.obs_emb.weight"]
    assert reader.shape[1] == 4
    torch.testing.assert_close(reader[:, :2], first.model_state["model.obs_emb.weight"], atol=1e-6, rtol=0)
    torch.testing.assert_close(reader[:, 2:], torch.zeros_like(reader[:, 2:]), atol=1e-6, rtol=0)

    # Same noise, any goal: the warm-started policy acts as the checkpoint did.
    old, new = load_diffusion_policy(tmp_path / "first"), load_diffusion_policy(tmp_path / "wider")
    for goal in ([1.0, 1.0], [-1.0, 0.5]):
        old.reset(3)
        new.reset(3)
        state = np.array([0.2, -0.4], np.float32)
        expected = old.act({"observation.state": state}).actions
        got = new.act(
            {"observation.state": state, "observation.environment_state": np.array(goal, np.float32)}
        )
        np.testing.assert_allclose(got.actions, expected, atol=1e-4)

    # Removing an input the checkpoint reads is refused, naming it.
    narrower = with_keys(["observation.environment_state"], steps=4)
    narrower.init_from = str(tmp_path / "first")
    with pytest.raises(UserError, match=r"observation\.state\[0\]"):
        train(narrower, tmp_path / "narrower")


def test_missing_dataset_path_and_wrong_widths_are_user_errors(state_store, tmp_path):
    with pytest.raises(UserError, match="dataset.path"):
        run(TrainConfig(), tmp_path)
    cfg = toy_config(state_store)
    cfg.policy_model.encoder.lowdim_dims = [3, 2]
    with pytest.raises(UserError, match=r"lowdim_dims=\[2, 2\]"):
        run(cfg, tmp_path)
    with pytest.raises(UserError, match="data_on_device"):
        toy_config(state_store, data_on_device="gpu")
    cfg = toy_config(state_store, data_on_device="on")
    cfg.dataset.cache = "none"  # windows read from disk one by one cannot be gathered on the device
    with pytest.raises(UserError, match="data_on_device=on"):
        run(cfg, tmp_path / "on")


def test_warmup_cosine_schedule():
    f = lambda s: warmup_cosine(s, warmup_steps=10, total_steps=110, min_ratio=0.1)  # noqa: E731
    assert f(0) == 0.0 and f(5) == 0.5 and f(10) == 1.0
    assert f(60) == pytest.approx(0.55) and f(110) == pytest.approx(0.1) and f(500) == pytest.approx(0.1)
    assert all(f(s) >= f(s + 1) for s in range(10, 120))


def test_epoch_batch_sampler_shards_epochs_and_resumes_mid_epoch():
    ranks = [EpochBatchSampler(50, 4, seed=3, rank=r, world_size=2) for r in range(2)]
    assert ranks[0].batches_per_epoch == 6  # 25 items per rank -> 6 full batches
    e0 = [set(sum(s.epoch_batches(0), [])) for s in ranks]
    assert not e0[0] & e0[1] and len(e0[0]) == len(e0[1]) == 24
    assert ranks[0].epoch_batches(0) != ranks[0].epoch_batches(1)  # reshuffled each epoch
    assert ranks[0].epoch_batches(1) == EpochBatchSampler(50, 4, seed=3, rank=0, world_size=2).epoch_batches(
        1
    )
    it = iter(ranks[0])
    full = [next(it) for _ in range(15)]
    resumed = iter(EpochBatchSampler(50, 4, seed=3, rank=0, world_size=2, start_batch=8))
    assert [next(resumed) for _ in range(7)] == full[8:]  # crosses the epoch boundary at 12
    with pytest.raises(UserError, match="batch_size"):
        EpochBatchSampler(5, 4, seed=0, world_size=2)


def test_ema_power_schedule_and_update():
    cfg = EMAConfig()
    assert ema_decay(cfg, 0) == 0.0
    assert ema_decay(cfg, 1) == pytest.approx(1 - 2**-0.75)
    assert ema_decay(cfg, 10**9) == cfg.max_decay
    assert ema_decay(EMAConfig(decay=0.9, update_after_step=2), 1) == 0.0
    assert ema_decay(EMAConfig(decay=0.9, update_after_step=2), 2) == 0.9
    with pytest.raises(UserError):
        EMAConfig(max_decay=1.0)

    model = torch.nn.Linear(3, 2)
    model.register_buffer("count", torch.tensor(0))
    ema = EMA(model, EMAConfig(decay=0.75))
    with torch.no_grad():
        model.weight.fill_(1.0)
        model.count.fill_(5)
    before = ema.model.weight.clone()
    ema.update(model)
    torch.testing.assert_close(ema.model.weight, 0.75 * before + 0.25 * torch.ones(2, 3))
    assert int(ema.model.count) == 5 and ema.num_updates == 1
    assert not ema.model.weight.requires_grad and not ema.model.training


def test_metrics_log_resume_drops_rows_of_an_abandoned_branch(tmp_path):
    log = MetricsLog(tmp_path / "m.csv")
    for step in (10, 20, 30):
        log.log(step, {"loss": 1.0 / step})
    log.log(30, {"val_loss": 0.5})
    log.write()
    again = MetricsLog.resume(tmp_path / "n.csv", tmp_path / "m.csv", up_to_step=20)
    assert [r["step"] for r in again.rows] == [10.0, 20.0] and again.rows[1]["loss"] == pytest.approx(0.05)
    assert log.columns() == ["step", "loss", "val_loss"]


def test_cli_composes_train_yaml_and_runs(state_store, tmp_path):
    import json

    from dreamrt.cli.main import main

    args = [
        "train",
        str(state_store),
        "policy_model=tiny",
        "policy_model.encoder.use_language=false",
        "policy_model.encoder.lowdim_dims=[2,2]",
        "trainer.steps=6",
        "trainer.batch_size=8",
        "trainer.save_every=3",
        "trainer.device=cpu",
        "trainer.threads=1",
        "trainer.progress=false",
        "--out",
        str(tmp_path / "run"),
        "--json",
        str(tmp_path / "summary.json"),
    ]
    assert main(args) == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["steps"] == 6 and summary["checkpoint"].endswith("step_000006")
    cfg = load_checkpoint(tmp_path / "run").config
    assert cfg["model"]["n_layer"] == 2 and cfg["model"]["horizon"] == 8 and cfg["n_action_steps"] == 4
    assert main(["train", str(state_store), "trainer.stpes=3"]) == 2  # a misspelt key is a user error


def test_train_logs_simulated_rollout_success_every_eval_every_steps(tmp_path):
    """`dreamrt train` with trainer.eval_every rolls the EMA policy out in the CALVIN-style sim."""
    from dreamrt.training.train_policy import RolloutEvalConfig

    store = record_demos(tmp_path, "turn_on_led", cameras=False)
    cfg = toy_config(store, language=True, steps=4, eval_every=2, val_every=0, save_every=0)
    cfg.policy_model.encoder = ObsEncoderConfig(
        lowdim_keys=["observation.state", "observation.environment_state"],
        lowdim_dims=[15, 24],
        use_language=True,
        language_dim=16,
    )
    cfg.policy_model.action_mode = "rel_cartesian"
    cfg.eval = RolloutEvalConfig(tasks=["turn_on_led", "open_drawer"], max_steps_per_subtask=12)
    result = run(cfg, tmp_path / "run")
    assert result.exit_code == 0
    rows = [r for r in read_metrics(tmp_path / "run" / "metrics.csv") if r.get("eval/success")]
    assert [r["step"] for r in rows] == ["2", "4"]
    for r in rows:
        assert 0.0 <= float(r["eval/success"]) <= 1.0 and float(r["eval/episodes"]) == 2.0
    with pytest.raises(UserError, match="open_drawr"):
        RolloutEvalConfig(tasks=["open_drawr"])
