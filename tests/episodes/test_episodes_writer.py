"""Writer and reader: layout readable by plain zarr, frames refused cleanly, bounded memory,
discard, lock, reopen, statistics."""

import json
import re
import warnings

import numpy as np
import pytest
import zarr

from dreamrt.episodes import Feature, create_store, open_store, open_writer
from dreamrt.episodes.format import PARTIAL_FILE
from dreamrt.episodes.inspect import verify_store
from dreamrt.errors import UserError

FEATURES = {
    "observation.state": {"dtype": "float32", "shape": [3], "names": ["x", "y", "z"]},
    "observation.environment_state": {"dtype": "float32", "shape": [2]},
    "observation.images.front": {"dtype": "uint8", "shape": [6, 5, 3]},
    "observation.depth.front": {"dtype": "uint16", "shape": [6, 5]},
    "action": {"dtype": "float32", "shape": [2]},
}


def frame(e, t):
    return {
        "observation.state": np.array([e, t, 0.5 * t], np.float32),
        "observation.environment_state": np.array([t, -t], np.float32),
        "observation.images.front": np.full((6, 5, 3), (10 * e + t) % 256, np.uint8),
        "observation.depth.front": np.full((6, 5), 1000 + t, np.uint16),
        "action": np.array([e + 0.25, t], np.float32),
    }


def write(path, lengths, tasks=None, **kw):
    with create_store(path, FEATURES, fps=20, robot_type="arm", chunk_frames=4, flush_frames=8, **kw) as w:
        for e, n in enumerate(lengths):
            for t in range(n):
                w.add_frame(frame(e, t), task=(tasks[e] if tasks else f"task {e}"))
            assert w.end_episode() == e
    return path


def test_round_trip_and_plain_zarr_layout(tmp_path):
    path = write(tmp_path / "s.zarr", [5, 17, 3], tasks=["a", "b", "a"])
    store = open_store(path)
    assert (store.num_episodes, store.num_frames) == (3, 25)
    assert store.episode_lengths.tolist() == [5, 17, 3]
    assert store.tasks == ["a", "b"] and store.episode_tasks(2) == ["a"]
    ep = store.get_episode(1)
    assert ep.length == 17 and set(ep) == set(store.keys)
    np.testing.assert_array_equal(ep["action"], np.stack([frame(1, t)["action"] for t in range(17)]))
    np.testing.assert_array_equal(ep["observation.depth.front"][:, 0, 0], 1000 + np.arange(17))
    np.testing.assert_allclose(ep["timestamp"], np.arange(17) / 20)
    np.testing.assert_array_equal(ep["task_index"], np.ones(17))
    assert store.get_episode(-1).index == 2
    info = store.info
    assert info["fps"] == 20 and info["robot_type"] == "arm" and info["total_frames"] == 25
    assert info["features"]["observation.state"]["names"] == ["x", "y", "z"]
    assert info["features"]["observation.images.front"]["names"] == ["height", "width", "channel"]

    # Any zarr user reads diffusion_policy's layout directly.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        root = zarr.open_group(path, mode="r")
    assert root["meta/episode_ends"][:].tolist() == [5, 22, 25]
    assert root["meta/episode_ends"].dtype == np.int64
    assert root["data/observation.images.front"].shape == (25, 6, 5, 3)
    assert root["data/observation.images.front"].chunks[0] == 4
    assert root["data/action"].compressors  # compressed
    assert json.loads((path / "meta/info.json").read_text())["tasks"] == ["a", "b"]


def test_stats_match_numpy(tmp_path):
    store = open_store(write(tmp_path / "s.zarr", [9, 14]))
    stats = store.stats
    state = store.read("observation.state").astype(np.float64)
    np.testing.assert_allclose(stats["observation.state"]["mean"], state.mean(0))
    np.testing.assert_allclose(stats["observation.state"]["std"], state.std(0))
    np.testing.assert_array_equal(stats["observation.state"]["min"], state.min(0))
    img = store.read("observation.images.front").astype(np.float64)
    assert stats["observation.images.front"]["mean"].shape == (3,)  # per channel
    np.testing.assert_allclose(stats["observation.images.front"]["mean"], img.mean((0, 1, 2)))
    np.testing.assert_allclose(stats["observation.images.front"]["std"], img.std((0, 1, 2)))
    assert stats["observation.depth.front"]["max"] == 1013
    on_disk = json.loads((store.path / "meta/stats.json").read_text())
    np.testing.assert_allclose(on_disk["observation.state"]["std"], state.std(0))


def test_reopen_appends_and_merges_stats(tmp_path):
    path = write(tmp_path / "s.zarr", [6, 7])
    with open_writer(path, flush_frames=8) as w:
        assert (w.num_episodes, w.num_frames, w.tasks) == (2, 13, ["task 0", "task 1"])
        for t in range(11):
            w.add_frame(frame(2, t), task="task 0")
        assert w.end_episode() == 2
    store = open_store(path)
    assert store.episode_lengths.tolist() == [6, 7, 11]
    assert store.tasks == ["task 0", "task 1"]
    np.testing.assert_array_equal(store.read("episode_index"), np.repeat([0, 1, 2], [6, 7, 11]))
    act = store.read("action").astype(np.float64)
    np.testing.assert_allclose(store.stats["action"]["std"], act.std(0))
    assert verify_store(path)[0] == []


BAD_FRAMES = [
    ("missing", lambda f: f.pop("action"), "missing key"),
    ("extra", lambda f: f.update({"actoin": np.zeros(2)}), "Did you mean 'action'"),
    ("reserved", lambda f: f.update({"frame_index": 3}), "undeclared key"),
    ("shape", lambda f: f.update({"action": np.zeros(3, np.float32)}), "shape (3,)"),
    ("image float", lambda f: f.update({"observation.images.front": np.zeros((6, 5, 3))}), "dtype float64"),
    (
        "int overflow",
        lambda f: f.update({"observation.images.front": np.full((6, 5, 3), 300)}),
        "integers in range",
    ),
    ("bool", lambda f: f.update({"action": np.array([True, False])}), "dtype bool"),
    ("nan", lambda f: f["observation.state"].__setitem__(1, np.nan), "NaN or inf"),
    ("inf", lambda f: f.update({"observation.environment_state": np.array([np.inf, 0])}), "NaN or inf"),
    ("float64 overflow", lambda f: f.update({"action": np.array([1e300, 0.0])}), "NaN or inf"),
    ("timestamp", lambda f: f.update({"timestamp": -1.0}), "strictly increase"),
    ("timestamp nan", lambda f: f.update({"timestamp": float("nan")}), "finite"),
]


@pytest.fixture(scope="module")
def reference_store(tmp_path_factory):
    return write(tmp_path_factory.mktemp("ref") / "ref.zarr", [4, 12])


@pytest.mark.parametrize("name, spoil, message", BAD_FRAMES, ids=[b[0] for b in BAD_FRAMES])
def test_bad_frames_are_refused_and_leave_nothing(tmp_path, reference_store, name, spoil, message):
    key_named = {"missing": "action", "extra": "actoin", "shape": "action", "nan": "observation.state"}
    ref = reference_store
    path = tmp_path / "s.zarr"
    with create_store(path, FEATURES, fps=20, chunk_frames=4, flush_frames=8) as w:
        for t in range(4):
            w.add_frame(frame(0, t), task="task 0")
        w.end_episode()
        for t in range(12):
            # first frame (any timestamp is fine there), mid-block, right before a flush boundary
            if t in (0, 3, 7) and not (t == 0 and name == "timestamp"):
                bad = frame(1, t)
                spoil(bad)
                with pytest.raises(UserError, match=re.escape(message)) as err:
                    w.add_frame(bad, task="task 1")
                if name in key_named:
                    assert key_named[name] in str(err.value)
                assert w.episode_frames == t
            w.add_frame(frame(1, t), task="task 1")
        w.end_episode()
    got, want = open_store(path), open_store(ref)
    for key in want.keys:
        np.testing.assert_array_equal(got.read(key), want.read(key), err_msg=key)
    assert got.episode_lengths.tolist() == [4, 12]
    for key in ("observation.state", "action", "observation.images.front"):
        for f in ("mean", "std", "min", "max"):
            np.testing.assert_array_equal(got.stats[key][f], want.stats[key][f])


def test_safe_casts_are_accepted(tmp_path):
    path = tmp_path / "s.zarr"
    with create_store(
        path,
        {"action": {"dtype": "float32", "shape": [2]}, "observation.count": {"dtype": "int16", "shape": []}},
        fps=10,
    ) as w:
        w.add_frame({"action": np.array([0.1, 2.0], np.float64), "observation.count": 7}, task="t")
        w.add_frame({"action": [1, 2], "observation.count": np.int64(-3)}, task="t")
        w.end_episode()
    store = open_store(path)
    np.testing.assert_array_equal(store.read("action"), np.array([[0.1, 2.0], [1, 2]], np.float32))
    assert store.read("observation.count").tolist() == [7, -3]
    assert store.read("observation.count").dtype == np.int16


def test_explicit_timestamps(tmp_path):
    path = tmp_path / "s.zarr"
    with create_store(path, {"action": {"dtype": "float32", "shape": [1]}}, fps=10) as w:
        for ts in (1.7e9, 1.7e9 + 0.031, 1.7e9 + 0.07):
            w.add_frame({"action": [0.0], "timestamp": ts}, task="t")
        w.end_episode()
    ts = open_store(path).read("timestamp")
    assert ts.dtype == np.float64
    np.testing.assert_allclose(np.diff(ts), [0.031, 0.039], atol=1e-6)  # float32 would be off by ~100 s


def test_long_episode_is_flushed_past_the_commit(tmp_path):
    path = tmp_path / "s.zarr"
    w = create_store(path, FEATURES, fps=20, chunk_frames=4, flush_frames=8)
    reader = open_store(path)
    for t in range(21):
        w.add_frame(frame(0, t), task="long")
        assert w._buffered <= 8  # memory holds at most one flush block
    assert json.loads((path / PARTIAL_FILE).read_text())["flushed_frames"] == 16
    assert zarr.open_array(path / "data/action", mode="r").shape[0] == 16
    reader.refresh()
    assert reader.num_frames == 0 and reader.num_episodes == 0  # not committed, not visible
    w.end_episode()
    assert reader.refresh() is True and reader.num_frames == 21
    assert not (path / PARTIAL_FILE).exists()
    w.close()
    np.testing.assert_array_equal(reader.read("frame_index"), np.arange(21))


def test_discard_episode(tmp_path):
    path = tmp_path / "s.zarr"
    with create_store(path, FEATURES, fps=20, chunk_frames=4, flush_frames=8) as w:
        for t in range(5):
            w.add_frame(frame(0, t), task="keep")
        w.end_episode()
        for t in range(19):
            w.add_frame(frame(1, t), task="new task")
        w.discard_episode()
        assert w.episode_frames == 0 and w.tasks == ["keep"]
        for t in range(3):
            w.add_frame(frame(1, t), task="other")
        w.end_episode()
    store = open_store(path)
    assert store.episode_lengths.tolist() == [5, 3]
    assert store.tasks == ["keep", "other"]
    assert store.array("action").shape[0] == 8
    np.testing.assert_array_equal(store.read("task_index"), [0] * 5 + [1] * 3)
    assert verify_store(path)[0] == []


def test_one_writer_at_a_time(tmp_path):
    path = write(tmp_path / "s.zarr", [3])
    w = open_writer(path)
    with pytest.raises(UserError, match="Another writer"):
        open_writer(path)
    with pytest.raises(UserError, match="Another writer"):
        create_store(path, FEATURES, fps=20, overwrite=True)
    open_store(path)  # readers are fine
    w.close()
    open_writer(path).close()


def test_close_with_episode_in_progress_leaves_a_partial(tmp_path):
    path = write(tmp_path / "s.zarr", [4])
    w = open_writer(path)
    for t in range(6):
        w.add_frame(frame(1, t), task="unfinished")
    with pytest.warns(UserWarning, match="not committed"):
        w.close()
    with pytest.raises(UserError, match="closed"):
        w.add_frame(frame(1, 6), task="x")
    with open_writer(path, keep_partial=True) as w2:
        assert w2.num_episodes == 2 and w2.tasks == ["task 0", "unfinished"]
    assert open_store(path).episode_lengths.tolist() == [4, 6]


def test_create_refuses_existing_and_other_directories(tmp_path):
    path = write(tmp_path / "s.zarr", [2])
    with pytest.raises(UserError, match="already exists"):
        create_store(path, FEATURES, fps=20)
    create_store(path, {"action": {"dtype": "float32", "shape": [1]}}, fps=5, overwrite=True).close()
    assert open_store(path).num_episodes == 0 and open_store(path).fps == 5
    other = tmp_path / "photos"
    other.mkdir()
    (other / "cat.jpg").write_bytes(b"x")
    with pytest.raises(UserError, match="not a dreamrt episode store"):
        create_store(other, FEATURES, fps=20, overwrite=True)
    assert (other / "cat.jpg").exists()


@pytest.mark.parametrize(
    "features, message",
    [
        ({"state": {"dtype": "float32", "shape": [2]}}, "Invalid feature key"),
        ({"timestamp": {"dtype": "float64", "shape": []}}, "filled by the writer"),
        ({"observation.images.c": {"dtype": "float32", "shape": [4, 4, 3]}}, "uint8"),
        ({"observation.images.c": {"dtype": "uint8", "shape": [4, 4]}}, "height x width x channels"),
        ({"action": {"dtype": "complex64", "shape": [2]}}, "dtype 'complex64'"),
        ({"action": {"dtype": "float32", "shape": [2], "names": ["a"]}}, "1 names"),
        ({"action": {"dtype": "float32", "shape": [0]}}, "positive"),
        ({"action": {"dtype": "float32"}}, "'dtype', 'shape'"),
        ({}, "No features"),
    ],
)
def test_bad_feature_declarations(tmp_path, features, message):
    with pytest.raises(UserError, match=message):
        create_store(tmp_path / "s.zarr", features, fps=10)


def test_feature_objects_and_misc_errors(tmp_path):
    path = tmp_path / "s.zarr"
    with create_store(path, {"action": Feature("float32", (2,), ("l", "r"))}, fps=10) as w:
        with pytest.raises(UserError, match="no frames"):
            w.end_episode()
        with pytest.raises(UserError, match="task"):
            w.add_frame({"action": [0, 0]}, task="")
    store = open_store(path)
    with pytest.raises(UserError, match="does not exist"):
        store.get_episode(0)
    with pytest.raises(UserError, match="Did you mean 'action'"):
        store.read("acton")
    with pytest.raises(UserError, match="does not exist"):
        open_store(tmp_path / "missing.zarr")
    with pytest.raises(UserError, match="fps"):
        create_store(tmp_path / "t.zarr", {"action": Feature("float32", (2,))}, fps=0)


def test_durable_commit_and_dropped_writer_frees_the_lock(tmp_path):
    path = tmp_path / "s.zarr"
    w = create_store(path, {"action": {"dtype": "float32", "shape": [1]}}, fps=10, durable=True)
    w.add_frame({"action": [1.0]}, task="t")
    w.end_episode()
    del w  # never closed
    with open_writer(path) as w2:
        assert w2.num_episodes == 1


def test_half_created_store_can_be_overwritten(tmp_path):
    path = tmp_path / "s.zarr"
    (path / "meta").mkdir(parents=True)
    (path / "meta/writer.lock").write_text("")  # creation died right after taking the lock
    with pytest.raises(UserError, match="not a zarr store"):
        open_writer(path)
    create_store(path, {"action": {"dtype": "float32", "shape": [1]}}, fps=10, overwrite=True).close()
    assert open_store(path).num_episodes == 0


def test_zarr_local_store_replaces_chunk_files_atomically(tmp_path, monkeypatch):
    """Crash safety relies on this zarr behaviour: a chunk is written to a temporary file and
    renamed over the old one, so a killed process never leaves a torn chunk. If a zarr upgrade
    changes it, this test says so."""
    import pathlib

    arr = zarr.create_array(tmp_path / "a.zarr", shape=(8,), chunks=(4,), dtype="float32")
    targets = []
    real_replace = pathlib.Path.replace

    def recording_replace(self, target):
        targets.append(pathlib.Path(target).relative_to(tmp_path / "a.zarr").as_posix())
        return real_replace(self, target)

    monkeypatch.setattr(pathlib.Path, "replace", recording_replace)
    arr[4:6] = [1.0, 2.0]  # a partial chunk: read, modify, write
    assert targets == ["c/1"]
    assert arr[:].tolist() == [0, 0, 0, 0, 1, 2, 0, 0]


def test_bad_flush_size_releases_the_lock(tmp_path):
    with pytest.raises(UserError, match="multiple of chunk_frames"):
        create_store(tmp_path / "x.zarr", FEATURES, fps=10, chunk_frames=4, flush_frames=10)
    path = write(tmp_path / "s.zarr", [3])
    with pytest.raises(UserError, match="multiple of the image chunk"):
        open_writer(path, flush_frames=6)
    with open_writer(path, flush_frames=12) as w:  # the failed open did not keep the lock
        assert w.num_episodes == 1
