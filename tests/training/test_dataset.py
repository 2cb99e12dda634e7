"""EpisodeDataset: tensors, image layout, splits, and DataLoader workers opening their own store."""

import pickle
import shutil

import numpy as np
import pytest
import torch

from dreamrt.episodes import SamplerConfig, SequenceSampler, create_store, open_store
from dreamrt.errors import UserError
from dreamrt.training.dataset import EpisodeDataset, EpisodeDatasetConfig

LENGTHS = [9, 14, 6, 11]


@pytest.fixture(scope="module")
def store_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("ds") / "s.zarr"
    features = {
        "observation.state": {"dtype": "float32", "shape": [2]},
        "observation.images.cam": {"dtype": "uint8", "shape": [5, 4, 3]},
        "observation.depth.cam": {"dtype": "uint16", "shape": [5, 4]},
        "action": {"dtype": "float32", "shape": [3]},
    }
    rng = np.random.default_rng(0)
    with create_store(path, features, fps=10, chunk_frames=4, flush_frames=8) as w:
        for e, n in enumerate(LENGTHS):
            for t in range(n):
                w.add_frame(
                    {
                        "observation.state": [e, t],
                        "observation.images.cam": rng.integers(0, 256, (5, 4, 3)).astype(np.uint8),
                        "observation.depth.cam": np.full((5, 4), 100 * e + t, np.uint16),
                        "action": [t, e, -t],
                    },
                    task="t",
                )
            w.end_episode()
    return path


def _cfg(path, **kw):
    return EpisodeDatasetConfig(
        path=str(path), sampler=SamplerConfig(horizon=6, n_obs_steps=2, n_action_steps=3), **kw
    )


def test_items_are_tensors_matching_the_sampler(store_path):
    ds = EpisodeDataset(_cfg(store_path, split="all"))
    store = open_store(store_path)
    ref = SequenceSampler(store.to_numpy(), store.episode_ends, ds.cfg.sampler)
    assert len(ds) == len(ref) == sum(n - 6 + 1 + 3 for n in LENGTHS)
    for i in (0, 5, len(ds) - 1):
        item, want = ds[i], ref.sample(i)
        assert item["observation.state"].dtype == torch.float32 and item["observation.state"].shape == (2, 2)
        assert item["action"].shape == (6, 3)
        img = item["observation.images.cam"]
        assert img.shape == (2, 3, 5, 4) and img.dtype == torch.float32  # (To, C, H, W) in [0, 1]
        np.testing.assert_allclose(
            img.numpy(), want["observation.images.cam"].transpose(0, 3, 1, 2) / 255.0, rtol=1e-6
        )
        assert item["observation.depth.cam"].shape == (2, 1, 5, 4)
        np.testing.assert_array_equal(item["action"].numpy(), want["action"])
    raw = EpisodeDataset(_cfg(store_path, split="all", image_format="uint8"))[3]["observation.images.cam"]
    assert raw.dtype == torch.uint8 and raw.shape == (2, 3, 5, 4)


def test_dataloader_with_workers(store_path):
    ds = EpisodeDataset(_cfg(store_path, split="all", cache="none"))
    state = pickle.loads(pickle.dumps(ds)).__dict__
    assert state["_handles"] is None and state["sampler"].arrays == {}  # no open store travels
    loader = torch.utils.data.DataLoader(ds, batch_size=7, shuffle=False, num_workers=2)
    batches = list(loader)
    assert sum(len(b["action"]) for b in batches) == len(ds)
    got = torch.cat([b["action"] for b in batches])
    want = torch.stack([ds[i]["action"] for i in range(len(ds))])
    torch.testing.assert_close(got, want)
    imgs = torch.cat([b["observation.images.cam"] for b in batches])
    torch.testing.assert_close(imgs, torch.stack([ds[i]["observation.images.cam"] for i in range(len(ds))]))


def test_dataloader_workers_with_spawn(store_path):
    """Under spawn the dataset is pickled to each worker: it must reopen the store itself."""
    ds = EpisodeDataset(_cfg(store_path, split="all"))
    loader = torch.utils.data.DataLoader(ds, batch_size=16, num_workers=2, multiprocessing_context="spawn")
    got = torch.cat([b["observation.state"] for b in loader])
    torch.testing.assert_close(got, torch.stack([ds[i]["observation.state"] for i in range(len(ds))]))


def test_splits_are_disjoint_episodes(store_path):
    train = EpisodeDataset(_cfg(store_path, val_ratio=0.25, seed=1))
    val = train.split_dataset("val")
    assert train.episode_mask.sum() == 3 and val.episode_mask.sum() == 1
    assert not np.any(train.episode_mask & val.episode_mask)
    ep_of = lambda ds: {int(ds[i]["observation.state"][0, 0]) for i in range(len(ds))}  # noqa: E731
    assert ep_of(val) == set(np.flatnonzero(val.episode_mask)) and not ep_of(train) & ep_of(val)
    assert len(train) + len(val) == len(EpisodeDataset(_cfg(store_path, split="all")))


def test_normalizer_and_errors(store_path):
    ds = EpisodeDataset(_cfg(store_path, split="all"))
    norm = ds.normalizer()
    assert set(norm.keys) == {"observation.state", "action"}
    a = norm.normalize("action", ds[0]["action"].numpy())
    assert a.min() >= -1 - 1e-6 and a.max() <= 1 + 1e-6
    with pytest.raises(UserError, match="not in"):
        EpisodeDataset(
            EpisodeDatasetConfig(path=str(store_path), sampler=SamplerConfig(obs_keys=["observation.nope"]))
        )
    with pytest.raises(UserError, match="val_ratio"):
        EpisodeDatasetConfig(path=str(store_path), split="val")
    with pytest.raises(UserError, match="Unknown cache"):
        EpisodeDatasetConfig(path=str(store_path), cache="gpu")


def test_device_windows_equal_the_collated_items_including_edge_padding(store_path):
    lowdim = SamplerConfig(horizon=6, n_obs_steps=2, n_action_steps=3, obs_keys=["observation.state"])
    ds = EpisodeDataset(
        EpisodeDatasetConfig(path=str(store_path), sampler=lowdim, split="train", val_ratio=0.25)
    )
    windows = ds.device_windows("cpu")
    assert windows is not None and len(windows) == len(ds)
    every = torch.arange(len(ds)).flip(0)  # any order: every padded window at both episode edges
    got = windows.batch(every)
    want = torch.utils.data.default_collate([ds[int(i)] for i in every])
    assert got.keys() == want.keys()
    for key in want:
        assert got[key].dtype == torch.float32 and torch.equal(got[key], want[key]), key


def test_split_dataset_shares_the_in_memory_arrays_and_gives_the_same_windows(store_path):
    train = EpisodeDataset(_cfg(store_path, split="train", val_ratio=0.25))
    val = train.split_dataset("val")
    fresh = EpisodeDataset(_cfg(store_path, split="val", val_ratio=0.25))
    assert val._cached.keys() == train._cached.keys() == {"observation.state", "action"}
    assert all(val._cached[k] is train._cached[k] for k in val._cached)  # read and held once
    assert len(val) == len(fresh) and len(val) != len(train)
    for i in range(len(val)):
        a, b = val[i], fresh[i]
        assert all(torch.equal(a[k], b[k]) for k in b)


def test_validation_windows_share_the_training_splits_device_arrays(store_path, tmp_path):
    lowdim = SamplerConfig(horizon=6, n_obs_steps=2, n_action_steps=3, obs_keys=["observation.state"])
    train = EpisodeDataset(
        EpisodeDatasetConfig(path=str(store_path), sampler=lowdim, split="train", val_ratio=0.25)
    )
    val = train.split_dataset("val")
    train_windows = train.device_windows("cpu")
    shared = val.device_windows("cpu", share=train_windows)
    for key, array in shared.arrays.items():
        assert array is train_windows.arrays[key]  # one copy of the store on the device, not two
    own = val.device_windows("cpu")
    assert all(own.arrays[k] is not train_windows.arrays[k] for k in own.arrays)
    every = torch.arange(len(val))
    got, want = shared.batch(every), own.batch(every)
    assert len(shared) == len(val) != len(train_windows)
    assert all(torch.equal(got[k], want[k]) for k in want)
    # Another store (here a copy of the same one) is not the training split's: nothing is lent.
    copy = tmp_path / "copy.zarr"
    shutil.copytree(store_path, copy)
    elsewhere = EpisodeDataset(
        EpisodeDatasetConfig(path=str(copy), sampler=lowdim, split="val", val_ratio=0.25)
    )
    lent = elsewhere.device_windows("cpu", share=train_windows)
    assert all(lent.arrays[k] is not train_windows.arrays[k] for k in lent.arrays)


def test_device_windows_refuse_visual_keys_and_oversized_arrays(store_path):
    assert EpisodeDataset(_cfg(store_path)).device_windows("cpu") is None  # images and depth
    lowdim = SamplerConfig(horizon=6, n_obs_steps=2, n_action_steps=3, obs_keys=["observation.state"])
    ds = EpisodeDataset(EpisodeDatasetConfig(path=str(store_path), sampler=lowdim))
    assert ds.device_windows("cpu", max_bytes=16) is None
    assert (
        EpisodeDataset(
            EpisodeDatasetConfig(path=str(store_path), sampler=lowdim, cache="none")
        ).device_windows("cpu")
        is None
    )  # read from disk per window: nothing in memory to gather from
