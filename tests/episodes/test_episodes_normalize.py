"""Normalisers from statistics: ranges, round trips, constant dimensions, JSON."""

import json

import numpy as np
import pytest

from dreamrt.episodes import Normalizer, create_store, open_store
from dreamrt.episodes.normalize import affine_from_stats
from dreamrt.errors import UserError


def _stats(x, axes=(0,)):
    x = x.astype(np.float64)
    return {"mean": x.mean(axes), "std": x.std(axes), "min": x.min(axes), "max": x.max(axes)}


@pytest.fixture
def data():
    rng = np.random.default_rng(0)
    x = rng.normal(3.0, 5.0, size=(500, 4)).astype(np.float32)
    x[:, 2] = 7.0  # a constant dimension
    return x


def test_min_max_maps_range_to_unit_interval(data):
    norm = Normalizer.from_stats({"action": _stats(data)}, {"action": "min_max"})
    y = norm.normalize("action", data)
    assert y.dtype == np.float32
    live = [0, 1, 3]
    np.testing.assert_allclose(y[:, live].min(0), -1, atol=1e-6)
    np.testing.assert_allclose(y[:, live].max(0), 1, atol=1e-6)
    np.testing.assert_array_equal(y[:, 2], 0)  # constant: no divide by zero, maps to 0
    np.testing.assert_allclose(norm.unnormalize("action", y), data, rtol=1e-6, atol=1e-5)


def test_mean_std_round_trip(data):
    norm = Normalizer.from_stats({"action": _stats(data)}, {"action": "mean_std"})
    y = norm.normalize("action", data.astype(np.float64))
    assert y.dtype == np.float64
    np.testing.assert_allclose(y[:, [0, 1, 3]].mean(0), 0, atol=1e-12)
    np.testing.assert_allclose(y[:, [0, 1, 3]].std(0), 1, atol=1e-12)
    assert np.isfinite(y).all() and np.all(y[:, 2] == 0)
    np.testing.assert_allclose(norm.unnormalize("action", y), data, rtol=1e-12)


def test_json_round_trip_is_exact(data, tmp_path):
    stats = {"action": _stats(data), "observation.state": _stats(data[:, :2])}
    norm = Normalizer.from_stats(stats, {"action": "min_max", "observation.state": "mean_std"})
    text = json.dumps(norm.to_dict())
    again = Normalizer.from_dict(json.loads(text))
    for key in ("action", "observation.state"):
        x = data[:, :4] if key == "action" else data[:, :2]
        np.testing.assert_array_equal(norm.normalize(key, x), again.normalize(key, x))
    norm.save(tmp_path / "normalizer.json")
    loaded = Normalizer.load(tmp_path / "normalizer.json")
    assert loaded.keys == ["action", "observation.state"]
    assert loaded.params("action").mode == "min_max"


def test_batches_and_images_broadcast():
    img = np.random.default_rng(1).integers(0, 256, size=(10, 4, 4, 3)).astype(np.uint8)
    norm = Normalizer.from_stats(
        {"observation.images.c": _stats(img, (0, 1, 2))}, {"observation.images.c": "min_max"}
    )
    y = norm.normalize("observation.images.c", img)  # per channel over (T, H, W, C)
    assert y.shape == img.shape and y.dtype == np.float32
    np.testing.assert_allclose(y.reshape(-1, 3).min(0), -1, atol=1e-6)
    np.testing.assert_allclose(norm.unnormalize("observation.images.c", y), img, atol=1e-4)
    with pytest.raises(UserError, match="trailing axes"):
        norm.normalize("observation.images.c", img[..., :2])


def test_identity_and_dict_helpers(data):
    stats = {"action": _stats(data), "observation.state": _stats(data)}
    norm = Normalizer.from_stats(stats, {"action": "identity", "observation.state": "min_max"})
    batch = {"action": data, "observation.state": data, "task": "x"}
    out = norm.normalize_dict(batch)
    np.testing.assert_array_equal(out["action"], data)
    assert out["task"] == "x"
    back = norm.unnormalize_dict(out)
    np.testing.assert_allclose(back["observation.state"], data, rtol=1e-6, atol=1e-5)


def test_errors():
    stats = {"action": {"mean": [0.0], "std": [1.0], "min": [0.0], "max": [1.0]}}
    with pytest.raises(UserError, match="Unknown normalisation mode"):
        affine_from_stats("minmax", stats["action"])
    with pytest.raises(UserError, match="Did you mean 'action'"):
        Normalizer.from_stats(stats, {"acton": "min_max"})
    with pytest.raises(UserError, match="no key"):
        Normalizer.from_stats(stats).normalize("observation.state", [1.0])
    with pytest.raises(UserError, match="Not a dreamrt normaliser"):
        Normalizer.from_dict({"features": {}})


def test_from_store_stats_defaults(tmp_path):
    path = tmp_path / "s.zarr"
    features = {
        "observation.state": {"dtype": "float32", "shape": [2]},
        "observation.images.c": {"dtype": "uint8", "shape": [2, 2, 3]},
        "action": {"dtype": "float32", "shape": [2]},
    }
    with create_store(path, features, fps=10) as w:
        for t in range(20):
            w.add_frame(
                {
                    "observation.state": [t, 1.0],
                    "observation.images.c": np.full((2, 2, 3), t, np.uint8),
                    "action": [t * 2.0, -t],
                },
                task="t",
            )
        w.end_episode()
    store = open_store(path)
    norm = Normalizer.from_stats(store.stats)
    assert norm.keys == ["observation.state", "action"]  # low-dim features only by default
    act = store.read("action")
    np.testing.assert_allclose(norm.normalize("action", act)[[0, -1]], [[-1, 1], [1, -1]], atol=1e-6)
    np.testing.assert_array_equal(
        norm.normalize("observation.state", store.read("observation.state"))[:, 1], 0
    )
