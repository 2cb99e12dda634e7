"""Window sampler: indices and padding as diffusion_policy's SequenceSampler, split by episode."""

import numpy as np
import pytest

from dreamrt.episodes import (
    SamplerConfig,
    SequenceSampler,
    create_indices,
    create_store,
    open_store,
    split_episodes,
)
from dreamrt.errors import UserError


def test_indices_by_hand():
    # one episode of 4 frames, horizon 3, pad_before 1, pad_after 1: window starts -1, 0, 1, 2
    got = create_indices(np.array([4]), horizon=3, pad_before=1, pad_after=1)
    assert got.tolist() == [
        [0, 2, 1, 3],  # start -1: rows 0..1 at positions 1..2, position 0 repeats row 0
        [0, 3, 0, 3],
        [1, 4, 0, 3],
        [2, 4, 0, 2],  # start 2: rows 2..3 at positions 0..1, position 2 repeats row 3
    ]
    # second episode offsets rows; the mask drops the first one
    got = create_indices(
        np.array([4, 7]), horizon=3, pad_before=0, pad_after=0, episode_mask=np.array([False, True])
    )
    assert got.tolist() == [[4, 7, 0, 3]]
    # an episode shorter than the horizon still yields padded windows
    got = create_indices(np.array([2]), horizon=4, pad_before=1, pad_after=3)
    assert got.tolist() == [[0, 2, 1, 3], [0, 2, 0, 2], [1, 2, 0, 1]]


def _reference_windows(data, ends, horizon, pad_before, pad_after):
    """diffusion_policy's algorithm, spelled out naively: every window start from -pad_before to
    len - horizon + pad_after, each position clamped into the episode."""
    out = []
    start = 0
    for end in ends:
        length = end - start
        for s in range(-pad_before, length - horizon + pad_after + 1):
            pos = np.clip(np.arange(s, s + horizon), 0, length - 1) + start
            out.append(data[pos])
        start = end
    return out


@pytest.mark.parametrize("n_obs, n_act, horizon", [(2, 8, 16), (1, 1, 4), (3, 4, 5), (2, 8, 10)])
def test_windows_match_reference(n_obs, n_act, horizon):
    rng = np.random.default_rng(horizon)
    lengths = rng.integers(1, 25, size=6)
    ends = np.cumsum(lengths)
    obs = np.arange(ends[-1] * 2, dtype=np.float32).reshape(-1, 2)
    act = -np.arange(ends[-1], dtype=np.float32)[:, None]
    cfg = SamplerConfig(
        horizon=horizon, n_obs_steps=n_obs, n_action_steps=n_act, obs_keys=["observation.state"]
    )
    sampler = SequenceSampler({"observation.state": obs, "action": act}, ends, cfg)
    ref_obs = _reference_windows(obs, ends, horizon, n_obs - 1, n_act - 1)
    ref_act = _reference_windows(act, ends, horizon, n_obs - 1, n_act - 1)
    assert len(sampler) == len(ref_obs)
    for i in range(len(sampler)):
        w = sampler.sample(i)
        np.testing.assert_array_equal(w["observation.state"], ref_obs[i][:n_obs])
        np.testing.assert_array_equal(w["action"], ref_act[i])


class CountingArray:
    """A numpy array that records which rows were read."""

    def __init__(self, data):
        self.data = data
        self.rows_read = 0

    def __getitem__(self, sl):
        out = self.data[sl]
        self.rows_read += len(out)
        return out


def test_only_first_obs_steps_are_loaded():
    data = np.arange(40, dtype=np.float32)[:, None]
    obs, act = CountingArray(data), CountingArray(data)
    cfg = SamplerConfig(horizon=16, n_obs_steps=2, obs_keys=["observation.x"])
    sampler = SequenceSampler({"observation.x": obs, "action": act}, np.array([40]), cfg)
    w = sampler.sample(10)
    assert w["observation.x"].shape == (2, 1) and w["action"].shape == (16, 1)
    assert obs.rows_read == 2 and act.rows_read == 16
    first = sampler.sample(0)  # starts one frame before the episode: padded with frame 0
    assert first["observation.x"][:, 0].tolist() == [0, 0]
    assert first["action"][:2, 0].tolist() == [0, 0]
    last = sampler.sample(len(sampler) - 1)  # runs 7 frames past the end: padded with frame 39
    assert last["action"][-8:, 0].tolist() == [39] * 8


def test_samples_are_copies():
    data = np.arange(10, dtype=np.float32)[:, None]
    cfg = SamplerConfig(horizon=2, n_obs_steps=1, n_action_steps=1, obs_keys=[])
    sampler = SequenceSampler({"action": data}, np.array([10]), cfg)
    sampler.sample(3)["action"][:] = -1
    assert data.min() == 0


def test_sampler_over_zarr_equals_numpy(tmp_path):
    path = tmp_path / "s.zarr"
    features = {
        "observation.state": {"dtype": "float32", "shape": [2]},
        "observation.images.c": {"dtype": "uint8", "shape": [4, 4, 3]},
        "action": {"dtype": "float32", "shape": [1]},
    }
    with create_store(path, features, fps=10, chunk_frames=4, flush_frames=8) as w:
        for e, n in enumerate([7, 3, 12]):
            for t in range(n):
                w.add_frame(
                    {
                        "observation.state": [e, t],
                        "observation.images.c": np.full((4, 4, 3), t, np.uint8),
                        "action": [t],
                    },
                    task="t",
                )
            w.end_episode()
    store = open_store(path)
    cfg = SamplerConfig(horizon=6, n_obs_steps=2, n_action_steps=4)
    on_disk = SequenceSampler({k: store.array(k) for k in store.keys}, store.episode_ends, cfg)
    in_memory = SequenceSampler(store.to_numpy(), store.episode_ends, cfg)
    assert on_disk.obs_keys == ["observation.state", "observation.images.c"]
    for i in range(len(on_disk)):
        a, b = on_disk.sample(i), in_memory.sample(i)
        for key in a:
            np.testing.assert_array_equal(a[key], b[key])


def test_split_is_seeded_and_by_episode():
    a, b = split_episodes(20, 0.2, seed=3), split_episodes(20, 0.2, seed=3)
    assert a.sum() == 4 and np.array_equal(a, b)
    assert not np.array_equal(a, split_episodes(20, 0.2, seed=4))
    assert split_episodes(5, 0.0).sum() == 0
    assert split_episodes(2, 0.9).sum() == 1  # always leaves a training episode
    ends = np.array([5, 9, 15, 20])
    val = np.array([False, True, False, True])
    rows_train = create_indices(ends, 4, 1, 3, ~val)
    rows_val = create_indices(ends, 4, 1, 3, val)
    train_rows = {r for s, e, _, _ in rows_train for r in range(s, e)}
    val_rows = {r for s, e, _, _ in rows_val for r in range(s, e)}
    assert not train_rows & val_rows
    with pytest.raises(UserError):
        split_episodes(5, 1.0)


def test_config_validation():
    with pytest.raises(UserError, match="cannot exceed"):
        SamplerConfig(horizon=2, n_obs_steps=3)
    with pytest.raises(UserError, match="both"):
        SamplerConfig(obs_keys=["action"])
    with pytest.raises(UserError, match="not in the data"):
        SequenceSampler(
            {"action": np.zeros((3, 1))}, np.array([3]), SamplerConfig(obs_keys=["observation.x"])
        )
    assert SamplerConfig(horizon=4, n_obs_steps=2, n_action_steps=8).resolved_pad_after == 3
