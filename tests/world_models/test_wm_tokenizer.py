"""Frame tokenizer: shapes, PSNR, image conversion, latent normalisation, save/load, a tiny overfit."""

import numpy as np
import pytest
import torch

from dreamrt.errors import UserError
from dreamrt.world_models.synthetic import MovingSquareConfig, moving_square_episode
from dreamrt.world_models.tokenizer import (
    Tokenizer,
    TokenizerConfig,
    decoder_flops,
    images_to_tensor,
    load_tokenizer,
    preset,
    psnr,
    save_tokenizer,
    tensor_to_images,
)


def _frames(n: int = 8, size: int = 16) -> torch.Tensor:
    ep = moving_square_episode(
        n, MovingSquareConfig(image_size=size, square=5, speed=2), np.random.default_rng(0)
    )
    return images_to_tensor(ep["frames"])  # (n, 3, size, size)


def test_round_trip_shapes():
    small = Tokenizer(preset("small")).eval()
    assert small.config.latent_size == 8 and small.config.downsample == 8
    images = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        z = small.encode(images)
        assert z.shape == (2, 8, 8, 8)
        assert small.decode(z).shape == (2, 3, 64, 64)
    tiny = Tokenizer(preset("tiny")).eval()
    with torch.no_grad():
        assert tiny.encode(torch.rand(3, 3, 16, 16)).shape == (3, 4, 4, 4)
    with pytest.raises(UserError, match="images_to_tensor"):
        small.encode(torch.rand(2, 3, 96, 96))
    assert decoder_flops(small.config) > 0


def test_psnr_and_image_conversion():
    a = torch.full((2, 3, 4, 4), 0.5)
    b = a.clone()
    b[1] += 0.1  # MSE 0.01 -> 20 dB
    torch.testing.assert_close(psnr(b, a), torch.tensor([100.0, 20.0]))
    frames = np.random.default_rng(0).integers(0, 256, size=(2, 5, 96, 96, 3), dtype=np.uint8)
    x = images_to_tensor(frames, 64)
    assert x.shape == (2, 5, 3, 64, 64) and 0 <= float(x.min()) and float(x.max()) <= 1
    same = images_to_tensor(frames[0, 0])
    assert same.shape == (3, 96, 96)
    assert np.array_equal(tensor_to_images(same), frames[0, 0])
    with pytest.raises(UserError, match="uint8"):
        images_to_tensor(frames.astype(np.float32))


def test_latent_normalisation():
    model = Tokenizer(preset("tiny")).eval()
    images = _frames()
    model.fit_latent_stats(images)
    with torch.no_grad():
        z = model.encode(images)
    torch.testing.assert_close(z.mean(dim=(0, 2, 3)), torch.zeros(4), atol=1e-5, rtol=0)
    torch.testing.assert_close(z.std(dim=(0, 2, 3)), torch.ones(4), atol=1e-4, rtol=0)
    # decode undoes the normalisation: it sees the same raw latent as before.
    raw = model.encode_distribution(images)[0]
    with torch.no_grad():
        torch.testing.assert_close(model.decode(z), (model.decoder(raw) + 1) * 0.5, atol=1e-5, rtol=0)


def test_tiny_tokenizer_overfits_a_few_frames():
    images = _frames()
    torch.manual_seed(0)
    model = Tokenizer(preset("tiny"))
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    with torch.no_grad():
        before = float(psnr(model.decode(model.encode(images)).clamp(0, 1), images).mean())
    for _ in range(120):
        loss, _ = model.loss(images, kl_weight=1e-6)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        after = float(psnr(model.decode(model.encode(images)).clamp(0, 1), images).mean())
    assert after > before + 8.0 and after > 20.0, (before, after)


def test_save_load_round_trip(tmp_path):
    model = Tokenizer(preset("tiny")).eval()
    model.fit_latent_stats(_frames())
    save_tokenizer(model, tmp_path / "tok")
    loaded = load_tokenizer(tmp_path / "tok")
    assert loaded.config == model.config
    images = _frames()
    with torch.no_grad():
        assert torch.equal(loaded.encode(images), model.encode(images))


def test_config_validation():
    with pytest.raises(UserError, match="divisible by the downsampling"):
        TokenizerConfig(image_size=60)
    with pytest.raises(UserError, match="divisible by groups"):
        TokenizerConfig(channels=[30, 60])
    with pytest.raises(UserError, match="Did you mean 'small'"):
        preset("smal")


def test_relative_decoding_restores_the_reference_and_adds_only_the_predicted_change():
    torch.manual_seed(0)
    tok = Tokenizer(preset("tiny")).eval()
    frames = _frames(4)
    with torch.no_grad():
        z = tok.encode(frames)
        detail = tok.detail(frames[:1])
        # The reference frame's own latent decodes to the real frame, to float precision...
        assert torch.allclose(tok.decode(z[:1], detail), frames[:1], atol=1e-6)
        # ...and another latent to the real frame plus the change between the two decodes.
        later = tok.decode(z[3:4], detail)
        expected = frames[:1] + tok.decode(z[3:4]) - tok.decode(z[:1])
        assert torch.allclose(later, expected, atol=1e-6)
        assert not torch.allclose(later, frames[:1], atol=1e-3)
