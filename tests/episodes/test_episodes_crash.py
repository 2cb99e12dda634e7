"""Crash safety: a writer process SIGKILLed mid-episode, mid-flush or mid-commit loses no
committed episode, and the store reopens (partial episode discarded, or kept on request)."""

import json
import random
import time

import numpy as np
import pytest
from episode_writer_child import FLUSH, assert_episode, sigkill, spawn, wait_line

from dreamrt.episodes import open_store, open_writer
from dreamrt.episodes.format import PARTIAL_FILE
from dreamrt.episodes.inspect import VerifyConfig, run_verify, verify_store

LENGTH = 13  # not a multiple of the flush size: episodes share chunks


def _kill_at(path, mode, **spec):
    proc = spawn({"path": str(path), "mode": mode, "length": LENGTH, **spec})
    marker = {"hang_mid_episode": "READY", "hang_in_flush": "IN_FLUSH", "hang_in_commit": "IN_COMMIT"}.get(
        mode, "IN_DERIVED"
    )
    line = wait_line(proc, marker)
    sigkill(proc)
    return line


def _assert_committed(path, episodes, total=None):
    """The store opens and its first ``episodes`` episodes hold exactly what was written."""
    store = open_store(path)
    assert store.num_episodes == (episodes if total is None else total)
    for i in range(episodes):
        assert_episode(store, i, LENGTH)
    return store


def test_sigkill_mid_episode_discards_partial(tmp_path):
    path = tmp_path / "s.zarr"
    line = _kill_at(path, "hang_mid_episode", episodes=2, partial=20)
    assert int(line.split()[1]) > 0  # some rows of the partial episode were flushed to disk
    store = _assert_committed(path, 2)  # a reader opens it before any repair
    assert store.array("action").shape[0] > store.num_frames  # the flushed partial rows are there...
    assert (path / PARTIAL_FILE).exists()
    with open_writer(path) as w:  # ...and a writer discards them
        assert w.num_episodes == 2
        assert not (path / PARTIAL_FILE).exists()
        for _ in range(5):
            w.add_frame(
                {
                    "observation.state": np.zeros(3),
                    "observation.images.cam": np.zeros((8, 8, 3), np.uint8),
                    "action": np.zeros(2),
                },
                task="after crash",
            )
        assert w.end_episode() == 2
    store = _assert_committed(path, 2, total=3)
    assert store.episode_lengths.tolist() == [LENGTH, LENGTH, 5]
    assert store.episode_tasks(2) == ["after crash"]
    assert run_verify(VerifyConfig(str(path))).exit_code == 0


def test_sigkill_mid_episode_keep_partial_commits_flushed_rows(tmp_path):
    path = tmp_path / "s.zarr"
    line = _kill_at(path, "hang_mid_episode", episodes=2, partial=20)
    flushed = int(line.split()[1])
    with open_writer(path, keep_partial=True) as w:
        assert w.num_episodes == 3
    store = _assert_committed(path, 2, total=3)
    assert store.episode_lengths.tolist() == [LENGTH, LENGTH, flushed]
    ep = store.get_episode(2)
    np.testing.assert_array_equal(ep["observation.state"][:, 1], np.arange(flushed))
    assert ep.tasks == ["task 2"]
    # statistics include the kept rows exactly as if they had been committed normally
    states = store.read("observation.state")
    np.testing.assert_allclose(
        store.stats["observation.state"]["mean"], states.astype(np.float64).mean(0), rtol=1e-12
    )
    assert verify_store(path)[0] == []


@pytest.mark.parametrize("keep_partial", [False, True])
def test_sigkill_during_flush(tmp_path, keep_partial):
    path = tmp_path / "s.zarr"
    # hang in the second flush of the partial episode, after its first array was written
    line = _kill_at(path, "hang_in_flush", episodes=2, partial=40, hang_at=1)
    flushed_before = int(line.split()[1])
    store = open_store(path)
    lengths = {store.array(k).shape[0] for k in store.keys}
    assert len(lengths) > 1  # the arrays really were left at different lengths
    _assert_committed(path, 2)
    with open_writer(path, keep_partial=keep_partial) as w:
        assert w.num_episodes == (3 if keep_partial else 2)
    store = _assert_committed(path, 2, total=3 if keep_partial else 2)
    if keep_partial:
        assert store.episode_lengths[2] == flushed_before  # only the flush that completed
    assert {store.array(k).shape[0] for k in store.keys} == {store.num_frames}
    assert verify_store(path)[0] == []


@pytest.mark.parametrize("keep_partial", [False, True])
def test_sigkill_during_commit(tmp_path, keep_partial):
    path = tmp_path / "s.zarr"
    _kill_at(path, "hang_in_commit", episodes=2)
    store = _assert_committed(path, 2)  # episode_ends already has a third entry; readers ignore it
    assert store.array("action").shape[0] == 3 * LENGTH
    with open_writer(path, keep_partial=keep_partial) as w:
        assert w.num_episodes == (3 if keep_partial else 2)
    _assert_committed(path, 3 if keep_partial else 2)
    assert verify_store(path)[0] == []


def test_sigkill_after_commit_before_derived_files(tmp_path):
    path = tmp_path / "s.zarr"
    _kill_at(path, "hang_after_commit", episodes=2)
    _assert_committed(path, 3)  # the commit record counts: the episode is in
    problems, _ = verify_store(path)
    assert any("info.json" in p for p in problems) and any("stats.json" in p for p in problems)
    with open_writer(path):
        pass  # repairs the derived files
    assert verify_store(path)[0] == []
    info = json.loads((path / "meta/info.json").read_text())
    assert info["total_episodes"] == 3


def test_random_sigkills_while_streaming(tmp_path):
    """Kill a streaming writer at random moments (inside zarr writes too), reopen, continue."""
    path = tmp_path / "s.zarr"
    rng = random.Random(0)
    committed = 0
    for round_ in range(4):
        proc = spawn(
            {"path": str(path), "mode": "stream", "episodes": 50, "length": LENGTH, "create": round_ == 0}
        )
        wait_line(proc, "COMMITTED")
        time.sleep(rng.uniform(0.0, 0.3))
        sigkill(proc)
        store = open_store(path)
        assert store.num_episodes >= committed + 1
        committed = store.num_episodes
        for i in range(committed):
            assert_episode(store, i, LENGTH)
        with open_writer(path):
            pass
        assert verify_store(path)[0] == [], verify_store(path)
    assert committed >= 4


def test_stray_temporaries_are_removed_on_open(tmp_path):
    path = tmp_path / "s.zarr"
    _kill_at(path, "hang_mid_episode", episodes=1, partial=FLUSH + 1)
    stray = path / "data" / "action" / "c" / f"0.{'ab' * 16}.partial"
    stray.parent.mkdir(parents=True, exist_ok=True)
    stray.write_bytes(b"torn chunk")
    assert any("temporary" in n for n in verify_store(path)[1])
    with open_writer(path):
        pass
    assert not stray.exists()
    _assert_committed(path, 1)
