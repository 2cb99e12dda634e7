"""`dreamrt episodes merge` and the writer's bulk `add_episodes`: exact copies, resumable, refusals."""

import numpy as np
import pytest

from dreamrt.cli.main import main
from dreamrt.episodes import create_store, open_store, open_writer
from dreamrt.episodes.inspect import verify_store
from dreamrt.episodes.merge import MergeConfig, merge_stores
from dreamrt.errors import UserError

FEATURES = {
    "observation.state": {"dtype": "float32", "shape": [3]},
    "observation.images.top": {"dtype": "uint8", "shape": [8, 8, 3]},
    "action": {"dtype": "float32", "shape": [2]},
}


def make_store(path, lengths, tasks, seed, features=FEATURES):
    rng = np.random.default_rng(seed)
    with create_store(path, features, fps=15, chunk_frames=4, flush_frames=8) as w:
        for e, n in enumerate(lengths):
            for t in range(n):
                frame = {k: rng.integers(0, 255, f["shape"]).astype(f["dtype"]) for k, f in features.items()}
                # Chains: the instruction changes within an episode; timestamps are not frame_index / fps.
                w.add_frame({**frame, "timestamp": 0.5 + 0.07 * t}, task=tasks[(e + t // 5) % len(tasks)])
            w.end_episode()
    return path


def rows(path):
    """Every committed row with instructions as strings, so stores with other task tables compare."""
    store = open_store(path)
    out = {k: store.read(k) for k in store.keys if k != "task_index"}
    out["task"] = np.array(store.tasks)[store.read("task_index")]
    return out


@pytest.fixture
def sources(tmp_path):
    a = make_store(tmp_path / "a.zarr", [7, 12, 5], ["pick", "place"], seed=0)
    b = make_store(tmp_path / "b.zarr", [9, 6], ["place", "open the drawer"], seed=1)
    return a, b


def test_merge_copies_every_episode_in_order_through_the_cli(sources, tmp_path):
    a, b = sources
    out = tmp_path / "m.zarr"
    assert main(["episodes", "merge", f"out={out}", f"sources=[{a},{b}]", "progress=false"]) == 0
    merged, ra, rb = open_store(out), rows(a), rows(b)
    assert (merged.num_episodes, merged.num_frames) == (5, 39)
    assert merged.tasks == ["pick", "place", "open the drawer"]
    np.testing.assert_array_equal(merged.episode_lengths, [7, 12, 5, 9, 6])
    got = rows(out)
    for key in ["observation.state", "observation.images.top", "action", "timestamp", "frame_index", "task"]:
        np.testing.assert_array_equal(got[key], np.concatenate([ra[key], rb[key]]), err_msg=key)
    np.testing.assert_array_equal(got["episode_index"], np.repeat(np.arange(5), [7, 12, 5, 9, 6]))
    state = np.concatenate([ra["observation.state"], rb["observation.state"]]).astype(np.float64)
    np.testing.assert_allclose(merged.stats["observation.state"]["mean"], state.mean(0), rtol=1e-12)
    np.testing.assert_allclose(merged.stats["observation.state"]["std"], state.std(0), rtol=1e-9)
    problems, _ = verify_store(out)
    assert problems == []


def test_small_blocks_give_the_same_store(sources, tmp_path):
    a, b = sources
    whole, pieces = tmp_path / "whole.zarr", tmp_path / "pieces.zarr"
    merge_stores(MergeConfig(out=str(whole), sources=[str(a), str(b)], progress=False))
    # One episode per block: five commits instead of two.
    merge_stores(MergeConfig(out=str(pieces), sources=[str(a), str(b)], progress=False, block_bytes=1))
    x, y = rows(whole), rows(pieces)
    for key in x:
        np.testing.assert_array_equal(x[key], y[key], err_msg=key)
    assert open_store(pieces).stats["action"]["mean"] == pytest.approx(
        open_store(whole).stats["action"]["mean"]
    )


def test_an_unfinished_merge_resumes_and_a_foreign_store_is_refused(sources, tmp_path):
    a, b = sources
    out = tmp_path / "m.zarr"
    # A merge cut short after the first source holds exactly that source's episodes.
    merge_stores(MergeConfig(out=str(out), sources=[str(a)], progress=False))
    summary, interrupted = merge_stores(MergeConfig(out=str(out), sources=[str(a), str(b)], progress=False))
    assert not interrupted and summary["resumed_after_episodes"] == 3 and summary["complete"]
    full = tmp_path / "full.zarr"
    merge_stores(MergeConfig(out=str(full), sources=[str(a), str(b)], progress=False))
    x, y = rows(out), rows(full)
    for key in x:
        np.testing.assert_array_equal(x[key], y[key], err_msg=key)
    # Running it again finds nothing left to add.
    summary, _ = merge_stores(MergeConfig(out=str(out), sources=[str(a), str(b)], progress=False))
    assert summary["episodes"] == 5 and summary["resumed_after_episodes"] == 5

    # A store that is not a prefix of these sources is left as it was.
    other = tmp_path / "other.zarr"
    merge_stores(MergeConfig(out=str(other), sources=[str(b)], progress=False))
    with pytest.raises(UserError, match="not an unfinished merge"):
        merge_stores(MergeConfig(out=str(other), sources=[str(a), str(b)], progress=False))
    assert open_store(other).num_episodes == 2


def test_refusals_name_the_problem(sources, tmp_path):
    a, b = sources
    with pytest.raises(UserError, match="also one of the sources"):
        MergeConfig(out=str(a), sources=[str(a), str(b)])
    with pytest.raises(UserError, match="twice"):
        MergeConfig(out=str(tmp_path / "m.zarr"), sources=[str(a), str(a)])
    with pytest.raises(UserError, match="sources="):
        MergeConfig(out=str(tmp_path / "m.zarr"), sources=[])
    wider = {**FEATURES, "action": {"dtype": "float32", "shape": [3]}}
    c = make_store(tmp_path / "c.zarr", [4], ["pick"], seed=2, features=wider)
    with pytest.raises(UserError, match=r"action: float32\[3\]"):
        merge_stores(MergeConfig(out=str(tmp_path / "m.zarr"), sources=[str(a), str(c)], progress=False))
    assert not (tmp_path / "m.zarr").exists()


def test_add_episodes_checks_everything_before_writing(sources):
    a, _ = sources
    before = rows(a)
    n = 10
    good = {
        "observation.state": np.zeros((n, 3), np.float64),  # float64 is cast, as add_frame does
        "observation.images.top": np.zeros((n, 8, 8, 3), np.uint8),
        "action": np.ones((n, 2), np.float32),
        "task_index": np.zeros(n, np.int64),
    }
    bad_calls = [
        ({**good, "action": np.ones((n, 3), np.float32)}, [4, 6], "shape"),
        ({**good, "action": np.full((n, 2), np.nan, np.float32)}, [4, 6], "NaN"),
        ({**good, "task_index": np.full(n, 3)}, [4, 6], "indexes past"),
        ({**good, "timestamp": np.r_[np.arange(4), np.arange(6)[::-1]] * 0.1}, [4, 6], "strictly increase"),
        ({k: v for k, v in good.items() if k != "action"}, [4, 6], "missing"),
        (good, [4, 5], "shape"),
    ]
    with open_writer(a) as w:
        for columns, lengths, message in bad_calls:
            with pytest.raises(UserError, match=message):
                w.add_episodes(columns, lengths, ["close the drawer"])
        assert (w.num_episodes, w.num_frames) == (3, 24)
        w.add_frame({k: v[0] for k, v in good.items() if k != "task_index"}, task="pick")
        with pytest.raises(UserError, match="in progress"):
            w.add_episodes(good, [4, 6], ["close the drawer"])
        w.discard_episode()
        # A new episode may start with an earlier timestamp than the previous one ended with.
        stamps = np.r_[np.arange(4), np.arange(6)] * 0.1
        assert w.add_episodes({**good, "timestamp": stamps}, [4, 6], ["close the drawer"]) == 5
    after = open_store(a)
    assert after.tasks == ["pick", "place", "close the drawer"]
    np.testing.assert_array_equal(after.read("frame_index", 24), np.r_[np.arange(4), np.arange(6)])
    np.testing.assert_array_equal(after.read("episode_index", 24), [3] * 4 + [4] * 6)
    np.testing.assert_array_equal(after.read("action", 0, 24), before["action"])
    assert verify_store(a)[0] == []
