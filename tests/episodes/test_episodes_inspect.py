"""`episodes info` and `episodes verify`: summaries, and every kind of damage detected."""

import json
import warnings

import numpy as np
import pytest
import zarr

from dreamrt.episodes import create_store
from dreamrt.episodes.inspect import InfoConfig, VerifyConfig, run_info, run_verify
from dreamrt.errors import UserError

FEATURES = {
    "observation.state": {"dtype": "float32", "shape": [3]},
    "observation.images.top": {"dtype": "uint8", "shape": [16, 16, 3]},
    "action": {"dtype": "float32", "shape": [2]},
}


def make_store(path, lengths=(20, 30, 25)):
    with create_store(path, FEATURES, fps=15, robot_type="toy", chunk_frames=8, flush_frames=16) as w:
        for e, n in enumerate(lengths):
            for t in range(n):
                img = np.zeros((16, 16, 3), np.uint8)
                img[t % 16, :, e % 3] = 200  # compressible, like a render
                w.add_frame(
                    {"observation.state": [e, t, 1.0], "observation.images.top": img, "action": [t, -t]},
                    task=["pick", "place"][e % 2],
                )
            w.end_episode()
    return path


@pytest.fixture
def store(tmp_path):
    return make_store(tmp_path / "s.zarr")


def _root(path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return zarr.open_group(path, mode="r+")


def test_info(store, capsys):
    result = run_info(InfoConfig(str(store)), None)
    out = capsys.readouterr().out
    s = result.summary
    assert result.exit_code == 0
    assert (s["episodes"], s["frames"], s["fps"], s["robot_type"]) == (3, 75, 15.0, "toy")
    assert s["tasks"] == ["pick", "place"]
    assert s["features"]["observation.images.top"] == {
        "dtype": "uint8",
        "shape": [16, 16, 3],
        "names": ["height", "width", "channel"],
    }
    assert s["data_bytes_uncompressed"] == 75 * (16 * 16 * 3 + 3 * 4 + 2 * 4 + 8 * 4)
    assert s["compression_ratio"] > 3  # the images are mostly zeros
    assert s["bytes_on_disk"] > s["data_bytes_on_disk"] > 0
    assert s["episode_length"] == {"min": 20, "mean": 25.0, "max": 30}
    for text in (
        "episodes         3",
        "frames           75",
        "15 fps",
        "[1] place",
        "observation.images.top",
        "ratio",
    ):
        assert text in out


def test_verify_ok(store, capsys):
    result = run_verify(VerifyConfig(str(store)), None)
    assert result.exit_code == 0 and result.summary["ok"] and result.summary["problems"] == []
    assert "ok" in capsys.readouterr().out


def test_missing_or_foreign_paths_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        run_verify(VerifyConfig(str(tmp_path / "nope.zarr")), None)
    (tmp_path / "dir").mkdir()
    with pytest.raises(UserError, match="not a zarr store"):
        run_info(InfoConfig(str(tmp_path / "dir")), None)
    zarr.open_group(tmp_path / "plain.zarr", mode="w").create_array("x", shape=(3,), dtype="int8")
    with pytest.raises(UserError, match="not a dreamrt episode store"):
        run_verify(VerifyConfig(str(tmp_path / "plain.zarr")), None)


def _nan_in_state(path):
    _root(path)["data/observation.state"][5, 1] = np.nan


def _non_monotone_ends(path):
    _root(path)["meta/episode_ends"][1] = 10


def _frame_index(path):
    _root(path)["data/frame_index"][23] = 99


def _episode_index(path):
    _root(path)["data/episode_index"][70] = 1


def _task_index(path):
    _root(path)["data/task_index"][3] = 5


def _timestamp(path):
    _root(path)["data/timestamp"][12] = 0.0


def _deleted_chunk(path):
    (path / "data/action/c/0/0").unlink()


def _garbage_chunk(path):
    (path / "data/observation.images.top/c/1/0/0/0").write_bytes(b"not blosc at all" * 10)


def _commit_garbage(path):
    (path / "meta/commit.json").write_text('{"format": "dreamrt.episodes", "num_ep')


def _commit_too_many_frames(path):
    commit = json.loads((path / "meta/commit.json").read_text())
    commit["num_frames"] = 80
    (path / "meta/commit.json").write_text(json.dumps(commit))


def _stats_file(path):
    stats = json.loads((path / "meta/stats.json").read_text())
    stats["action"]["mean"] = [0.0, 0.0]
    (path / "meta/stats.json").write_text(json.dumps(stats))


def _info_tasks(path):
    info = json.loads((path / "meta/info.json").read_text())
    info["tasks"] = ["pick"]
    (path / "meta/info.json").write_text(json.dumps(info))


def _undeclared_array(path):
    _root(path)["data"].create_array("observation.extra", shape=(75,), dtype="float32")


def _wrong_dtype(path):
    info = json.loads((path / "meta/info.json").read_text())
    info["features"]["action"]["dtype"] = "float64"
    (path / "meta/info.json").write_text(json.dumps(info))


CORRUPTIONS = [
    (_nan_in_state, "data/observation.state has NaN or inf at row 5"),
    (_non_monotone_ends, "meta/episode_ends is not strictly increasing"),
    (_frame_index, "data/frame_index[23] = 99"),
    (_episode_index, "data/episode_index[70] = 1"),
    (_task_index, "data/task_index has values outside [0, 2)"),
    (_timestamp, "data/timestamp does not increase within an episode"),
    (_deleted_chunk, "statistics of 'action'"),
    (_garbage_chunk, "data/observation.images.top rows [0, "),
    (_commit_garbage, "meta/commit.json cannot be read"),
    (_commit_too_many_frames, "the commit record says 80 frames"),
    (_stats_file, "meta/stats.json disagrees"),
    (_info_tasks, "meta/info.json tasks"),
    (_undeclared_array, "data/observation.extra is not declared"),
    (_wrong_dtype, "data/action is float32"),
]


@pytest.mark.parametrize("corrupt, message", CORRUPTIONS, ids=[c[0].__name__.strip("_") for c in CORRUPTIONS])
def test_verify_detects_damage(store, capsys, corrupt, message):
    corrupt(store)
    result = run_verify(VerifyConfig(str(store)), None)
    assert result.exit_code == 1 and not result.summary["ok"]
    problems = result.summary["problems"]
    assert any(message in p for p in problems), problems
    assert message.split(" ")[0] in capsys.readouterr().out
