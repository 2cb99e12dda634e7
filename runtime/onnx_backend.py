"""ONNX Runtime backend for DiffusionPolicy: export the graphs, run them behind the policy's plug points.

On this project's 2-core CPUs eager torch spends most of a small denoiser pass on per-op
overhead; ONNX Runtime runs the same DP-T 3-4x faster (``docs/onnx.md`` has the figures).
The sampler arithmetic stays in Python (a few elementwise ops on a (B, H, A) tensor per
step), so one exported denoiser step serves DDPM, DDIM and consistency sampling alike.

Export (:func:`export_policy`) writes a directory, by default ``<checkpoint>/onnx/``:

- ``encoder.onnx``: the observation encoder: normalised low-dim inputs, float images
  (B, To, 3, H, W) in [0, 1] and the scaled instruction embedding -> ``obs_features``
  (B, To, O) (:func:`dreamrt.policies.encoders.export_onnx`);
- ``denoiser.onnx``: ONE network evaluation: ``noisy_actions`` (B, H, A) float32,
  ``timesteps`` (1,) or (B,) int64, ``obs_features`` (B, To, O) -> ``model_output``
  (B, H, A), the raw DP-T output (epsilon or x0, per the checkpoint's prediction type; a
  consistency student's sampler applies its parameterisation to it, as in torch);
- ``blocks/`` (optional): the same network cut at its residual sub-blocks, for BAC caching
  under ONNX Runtime: ``condition.onnx`` (noisy_actions, timesteps, obs_features -> stream,
  memory), one ``block_NN.onnx`` per sub-block (stream, memory -> residual; FFN blocks take
  no memory), ``head.onnx`` (stream -> model_output) and ``reuse.onnx`` (noisy_actions,
  residual_sum -> model_output: a step at which no block is recomputed);
- ``normalizer.json`` (the checkpoint's) and ``manifest.json``: every graph's inputs and
  outputs (names, shapes with ``batch`` for the dynamic axis, dtypes), the opset, the
  torch / onnx / onnxruntime versions, the weights' sha256, the pre-processing the encoder
  expects (affine parameters included) and each graph's max abs error against torch,
  measured at export on random inputs at batch 1 and 3.

The export is written to a hidden directory beside the target and renamed into place, so
readers see the old export or the new one, never half of one.

Running (:func:`attach_onnxruntime`): the policy's ``encoder`` becomes an
:class:`OrtObservationEncoder` (the same call contract; the torch encoder's sub-modules stay
registered, so ``state_dict`` is unchanged) and its ``denoiser_factory`` an
:class:`OrtDenoiser` or, with a BAC schedule, an :class:`OrtCachedDenoiser`. Sessions use the
CUDA execution provider when this onnxruntime build has it, else the CPU one.

Dimensions: B batch, To observation steps, H horizon (action tokens), A action dim,
O per-step observation features, D DP-T width, M memory tokens, N sub-blocks, K sampler steps.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import shutil
import sys
import time
import uuid
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor, nn

from dreamrt.errors import UserError
from dreamrt.policies.encoders import IMAGE_PREFIX, TASK_EMBEDDING_KEY, TASK_KEY, ObservationEncoder

if TYPE_CHECKING:
    import onnxruntime as ort

    from dreamrt.policies.diffusion_policy import DiffusionPolicy
    from dreamrt.runtime.bac import BACSchedule

ONNX_DIR = "onnx"  # beside a checkpoint's model.safetensors
MANIFEST_FILE = "manifest.json"
ENCODER_FILE = "encoder.onnx"
DENOISER_FILE = "denoiser.onnx"
BLOCKS_DIR = "blocks"
CONDITION_FILE = f"{BLOCKS_DIR}/condition.onnx"
HEAD_FILE = f"{BLOCKS_DIR}/head.onnx"
REUSE_FILE = f"{BLOCKS_DIR}/reuse.onnx"
NORMALIZER_FILE = "normalizer.json"
FORMAT = "dreamrt-onnx-export"
FORMAT_VERSION = 1
DEFAULT_OPSET = 17
PARITY_BATCH_SIZES = (1, 3)  # batch 3 exercises the dynamic batch axis
PARITY_TOLERANCE = 1e-4  # float32 graphs agree with torch to ~1e-6; more means a broken export
CPU_PROVIDER = "CPUExecutionProvider"
CUDA_PROVIDER = "CUDAExecutionProvider"
DENOISER_INPUTS = ("noisy_actions", "timesteps", "obs_features")

Denoiser = Callable[[Tensor, int], Tensor]


# ---------------------------------------------------------------------------- sessions


def _ort():
    try:
        import onnxruntime
    except ImportError as error:  # pragma: no cover - a dependency of dreamrt
        raise UserError(
            f"backend=onnxruntime needs the onnxruntime package ({error}): `pip install onnxruntime` "
            "(onnxruntime-gpu for the CUDA provider)."
        ) from None
    return onnxruntime


def default_providers() -> list[str]:
    """CUDA first when this onnxruntime build has it; the CPU provider always (the fallback)."""
    available = _ort().get_available_providers()
    return [CUDA_PROVIDER, CPU_PROVIDER] if CUDA_PROVIDER in available else [CPU_PROVIDER]


def make_session(
    path: str | Path,
    threads: int | None = None,
    providers: Sequence[str] | None = None,
    *,
    spinning: bool = True,
) -> ort.InferenceSession:
    """An InferenceSession with this backend's settings.

    ``threads`` sizes the intra-op pool (None: onnxruntime's default, one per physical core).
    One inter-op thread and sequential execution: the graphs are chains of small ops, and a
    second pool would only compete for the cores. ``spinning=False`` makes idle pool threads
    sleep instead of spin: every session has its own pool, and the many block sessions of
    the cached denoiser, run one after another, otherwise leave their threads spinning
    against each other (measured: BAC DDPM-100 of a dp_reference-sized model, 2 threads,
    518 ms per chunk spinning, 37 ms not; 1 thread: 39 ms).
    """
    ort = _ort()
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.inter_op_num_threads = 1
    if threads is not None:
        options.intra_op_num_threads = int(threads)
    options.log_severity_level = 3  # errors only
    if not spinning:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), options, providers=list(providers or default_providers()))


def _numpy(x: Any) -> np.ndarray:
    """A float32 C-contiguous CPU array of ``x`` (a view of a CPU float32 tensor, no copy)."""
    x = torch.as_tensor(x).detach()
    if x.device.type != "cpu":
        x = x.cpu()
    if x.dtype != torch.float32:
        x = x.float()
    return x.contiguous().numpy()


def _run(session: ort.InferenceSession, feeds: dict[str, np.ndarray], what: str) -> list[np.ndarray]:
    """``session.run`` with onnxruntime's shape and type errors turned into a UserError."""
    try:
        return session.run(None, feeds)
    except Exception as error:
        if not type(error).__module__.startswith("onnxruntime"):
            raise
        got = {k: (tuple(v.shape), str(v.dtype)) for k, v in feeds.items()}
        want = {i.name: (tuple(i.shape), i.type) for i in session.get_inputs()}
        raise UserError(
            f"{what} rejected its inputs {got}; it takes {want} ('batch' is any size). onnxruntime said: "
            f"{str(error).strip().splitlines()[0]}"
        ) from None


# ---------------------------------------------------------------------------- export


class _DenoiserStep(nn.Module):
    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, noisy_actions: Tensor, timesteps: Tensor, obs_features: Tensor) -> Tensor:
        return self.model(noisy_actions, timesteps, obs_features)


class _Condition(nn.Module):
    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(
        self, noisy_actions: Tensor, timesteps: Tensor, obs_features: Tensor
    ) -> tuple[Tensor, Tensor]:
        memory = self.model.encode_condition(timesteps, obs_features)  # (B, M, D)
        return self.model.embed_actions(noisy_actions), memory  # stream (B, H, D), memory


class _Block(nn.Module):
    def __init__(self, block: nn.Module):
        super().__init__()
        self.block = block

    def forward(self, stream: Tensor, memory: Tensor) -> Tensor:
        return self.block(stream, memory)  # the residual (B, H, D)


class _Reuse(nn.Module):
    """A step at which no block updates: the embedded actions plus every cached residual, then the head."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, noisy_actions: Tensor, residual_sum: Tensor) -> Tensor:
        return self.model.head(self.model.embed_actions(noisy_actions) + residual_sum)


class _Head(nn.Module):
    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, stream: Tensor) -> Tensor:
        return self.model.head(stream)


def _export(module: nn.Module, args: tuple, path: Path, inputs: list[str], outputs: list[str], opset: int):
    """Trace ``module`` in eval mode to ``path`` with dim 0 of every tensor dynamic."""
    axes = {name: {0: "batch"} for name in [*inputs, *outputs]}
    if "timesteps" in axes:
        axes["timesteps"] = {0: "timestep_batch"}  # (1,) broadcasts over the batch; (B,) is per sample
    path.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        # The TorchScript exporter is deprecated; the dynamo exporter needs onnxscript (not installed).
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        # eval() on the wrapper: export restores the wrapper's mode recursively afterwards, and a
        # fresh wrapper is in training mode, which would leave dropout on in the policy's modules.
        torch.onnx.export(
            module.eval(),
            args,
            str(path),
            dynamo=False,
            input_names=inputs,
            output_names=outputs,
            dynamic_axes=axes,
            opset_version=opset,
        )


def block_file(index: int) -> str:
    return f"{BLOCKS_DIR}/block_{index:02d}.onnx"


def _io(args: Sequence[Any]) -> list[dict[str, Any]]:
    dtypes = {"tensor(float)": "float32", "tensor(int64)": "int64", "tensor(uint8)": "uint8"}
    return [{"name": a.name, "shape": list(a.shape), "dtype": dtypes.get(a.type, a.type)} for a in args]


def _entry(root: Path, relative: str, session: ort.InferenceSession, error: float) -> dict[str, Any]:
    return {
        "file": relative,
        "inputs": _io(session.get_inputs()),
        "outputs": _io(session.get_outputs()),
        "max_abs_error": float(error),
    }


def _max_error(a: Any, b: Any) -> float:
    return float(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)).max())


def _affine(policy: DiffusionPolicy, key: str) -> dict[str, Any]:
    p = policy.normalizer.params(key)
    return {"mode": p.mode, "scale": np.asarray(p.scale).tolist(), "offset": np.asarray(p.offset).tolist()}


def _preprocessing(policy: DiffusionPolicy) -> dict[str, Any]:
    """What a consumer of encoder.onnx must do to raw observations, and to the sampled actions."""
    c = policy.config
    out: dict[str, Any] = {
        "lowdim": {
            key: {**_affine(policy, key), "apply": "y = x * scale + offset (per dimension)"}
            for key in c.lowdim_keys
        },
        "images": {
            cam.key: {
                "layout": "(B, To, 3, H, W) float32 in [0, 1] (uint8 / 255, HWC transposed); centre crop in the graph",
                "height": cam.height,
                "width": cam.width,
            }
            for cam in c.encoder.cameras
        },
        "action": {
            "key": c.action_key,
            **_affine(policy, c.action_key),
            "apply": "the sampler's x0 is normalised: action = (x0 - offset) / scale",
        },
    }
    if c.encoder.use_language:
        out[TASK_EMBEDDING_KEY] = {
            "dim": int(policy.instruction_embeddings.shape[1]),
            "scale": float(c.instruction_scale),
            "apply": "the instruction's L2-normalised MiniLM embedding times scale",
        }
    return out


def _export_graphs(policy: DiffusionPolicy, tmp: Path, opset: int, blocks: bool, seed: int) -> list[str]:
    """Write the .onnx files into ``tmp``; returns the encoder's input names."""
    from dreamrt.policies.dpt import example_inputs
    from dreamrt.policies.encoders import export_onnx

    model = policy.model
    names = export_onnx(
        policy.encoder, tmp / ENCODER_FILE, n_obs_steps=policy.config.n_obs_steps, opset=opset
    )
    args = example_inputs(model.config, batch_size=2, seed=seed)  # (noisy, timesteps, features)
    _export(_DenoiserStep(model), args, tmp / DENOISER_FILE, list(DENOISER_INPUTS), ["model_output"], opset)
    if blocks:
        _export(
            _Condition(model), args, tmp / CONDITION_FILE, list(DENOISER_INPUTS), ["stream", "memory"], opset
        )
        with torch.no_grad():
            stream, memory = model.embed_actions(args[0]), model.encode_condition(args[1], args[2])
        for j, (_, block) in enumerate(model.sub_blocks):
            _export(
                _Block(block),
                (stream, memory),
                tmp / block_file(j),
                ["stream", "memory"],
                ["residual"],
                opset,
            )
        _export(_Head(model), (stream,), tmp / HEAD_FILE, ["stream"], ["model_output"], opset)
        _export(
            _Reuse(model),
            (args[0], stream),
            tmp / REUSE_FILE,
            ["noisy_actions", "residual_sum"],
            ["model_output"],
            opset,
        )
    return names


def _parity(policy: DiffusionPolicy, tmp: Path, names: list[str], blocks: bool, seed: int) -> dict[str, Any]:
    """Every graph against torch on seeded random inputs at PARITY_BATCH_SIZES; the manifest's graph entries."""
    from dreamrt.policies.dpt import example_inputs as denoiser_inputs
    from dreamrt.policies.encoders import example_inputs as encoder_inputs

    model, encoder = policy.model, policy.encoder
    c = policy.config
    # The CPU provider on one thread: the reference numbers should not depend on the machine.
    enc = make_session(tmp / ENCODER_FILE, 1, [CPU_PROVIDER])
    den = make_session(tmp / DENOISER_FILE, 1, [CPU_PROVIDER])
    errors = {"encoder": 0.0, "denoiser": 0.0}
    with torch.no_grad():
        for b in PARITY_BATCH_SIZES:
            inputs = encoder_inputs(encoder.config, b, c.n_obs_steps, seed=seed + b)
            out = enc.run(None, {n: x.numpy() for n, x in zip(names, inputs)})[0]
            errors["encoder"] = max(errors["encoder"], _max_error(out, encoder.forward_tensors(*inputs)))
            noisy, t, features = denoiser_inputs(model.config, b, seed=seed + 10 + b)
            for timesteps in (t, t[:1]):  # per sample, and one timestep broadcast over the batch
                ref = model(noisy, timesteps, features)
                out = den.run(None, {"noisy_actions": noisy.numpy(), "timesteps": timesteps.numpy(), "obs_features": features.numpy()})[0]  # fmt: skip
                errors["denoiser"] = max(errors["denoiser"], _max_error(out, ref))
    graphs = {
        "encoder": _entry(tmp, ENCODER_FILE, enc, errors["encoder"]),
        "denoiser": _entry(tmp, DENOISER_FILE, den, errors["denoiser"]),
    }
    if blocks:
        ort_blocks = OrtBlocks.load(tmp, [name for name, _ in model.sub_blocks], 1, [CPU_PROVIDER])
        error = 0.0
        with torch.no_grad():
            for b in PARITY_BATCH_SIZES:
                noisy, t, features = denoiser_inputs(model.config, b, seed=seed + 20 + b)
                error = max(error, _max_error(ort_blocks.full_step(noisy.numpy(), t.numpy(), features.numpy()), model(noisy, t, features)))  # fmt: skip
                residual_sum = torch.randn(b, model.config.horizon, model.config.n_emb, generator=torch.Generator().manual_seed(seed + b))  # fmt: skip
                ref = model.head(model.embed_actions(noisy) + residual_sum)
                out = ort_blocks.reuse.run(None, {"noisy_actions": noisy.numpy(), "residual_sum": residual_sum.numpy()})[0]  # fmt: skip
                error = max(error, _max_error(out, ref))
        params = [sum(p.numel() for p in block.parameters()) for _, block in model.sub_blocks]
        graphs["blocks"] = {
            "max_abs_error": error,  # the composed graphs (every block updated) against the full model
            "condition": _entry(tmp, CONDITION_FILE, ort_blocks.condition, error),
            "head": _entry(tmp, HEAD_FILE, ort_blocks.head, error),
            "reuse": _entry(tmp, REUSE_FILE, ort_blocks.reuse, error),
            "sub_blocks": [
                {"name": name, "params": n, **_entry(tmp, block_file(j), s, error)}
                for j, ((name, _), n, s) in enumerate(zip(model.sub_blocks, params, ort_blocks.blocks))
            ],
        }
    return graphs


def export_policy(
    policy: DiffusionPolicy,
    out_dir: str | Path,
    *,
    checkpoint: str | Path | None = None,
    opset: int = DEFAULT_OPSET,
    blocks: bool = True,
    seed: int = 0,
) -> dict[str, Any]:
    """Export ``policy``'s encoder and one denoiser step (and its sub-blocks) to ``out_dir``; returns the manifest.

    ``checkpoint`` (the directory the policy was loaded from) is recorded with its weights'
    sha256, which :func:`export_is_current` compares, and its ``normalizer.json`` is copied.
    Parity with torch is measured and recorded, not enforced: callers compare
    ``manifest["max_abs_error"]`` with their tolerance.
    """
    import onnx

    import dreamrt
    from dreamrt.policies.factory import saved_sampler
    from dreamrt.training.checkpoint import MODEL_FILE, read_meta

    if isinstance(policy.encoder, OrtObservationEncoder):
        raise UserError(
            "This policy already runs on onnxruntime; export from the torch policy (load it again)."
        )
    if not isinstance(opset, int) or not 14 <= opset <= 21:
        raise UserError(
            f"ONNX opset must be an int in 14..21 (scaled_dot_product_attention needs 14), got {opset!r}."
        )
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    was_training = policy.training
    policy.eval()
    start = time.perf_counter()
    try:
        names = _export_graphs(policy, tmp, opset, blocks, seed)
        for path in sorted(tmp.rglob("*.onnx")):
            onnx.checker.check_model(str(path))
        graphs = _parity(policy, tmp, names, blocks, seed)
        meta = read_meta(checkpoint) if checkpoint is not None else None
        if checkpoint is not None and (Path(checkpoint) / NORMALIZER_FILE).is_file():
            shutil.copyfile(Path(checkpoint) / NORMALIZER_FILE, tmp / NORMALIZER_FILE)
        else:
            (tmp / NORMALIZER_FILE).write_text(json.dumps(policy.normalizer.to_dict(), indent=1) + "\n")
        c = policy.config
        manifest = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "created_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "opset": opset,
            "versions": {
                "torch": torch.__version__,
                "onnx": onnx.__version__,
                "onnxruntime": _ort().__version__,
                "dreamrt": dreamrt.__version__,
            },
            "checkpoint": str(checkpoint) if checkpoint is not None else None,
            "model_sha256": meta.files.get(MODEL_FILE) if meta is not None else None,
            "step": meta.step if meta is not None else None,
            "policy": {
                "horizon": c.horizon,
                "n_obs_steps": c.n_obs_steps,
                "n_action_steps": c.n_action_steps,
                "action_dim": c.action_dim,
                "obs_feature_dim": c.encoder.obs_feature_dim,
                "width": c.model.n_emb,
                "prediction_type": c.noise.prediction_type,
                "num_train_timesteps": c.noise.num_train_timesteps,
                # What the checkpoint samples with (the graphs serve any sampler).
                "sampler": saved_sampler(checkpoint)
                if checkpoint is not None
                else dataclasses.asdict(c.sampler),
            },
            "preprocessing": _preprocessing(policy),
            "graphs": {k: v for k, v in graphs.items() if k != "blocks"},
            "blocks": graphs.get("blocks"),
            "parity": {
                "batch_sizes": list(PARITY_BATCH_SIZES),
                "inputs": f"random, seed {seed}",
                "provider": CPU_PROVIDER,
            },
            "max_abs_error": max(g["max_abs_error"] for g in graphs.values()),
            "export_s": round(time.perf_counter() - start, 3),
        }
        (tmp / MANIFEST_FILE).write_text(json.dumps(manifest, indent=1) + "\n")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        policy.train(was_training)
    _replace_dir(tmp, out_dir)
    return manifest


def _replace_dir(tmp: Path, target: Path) -> None:
    """Rename ``tmp`` to ``target``, replacing an existing ``target`` (renames only, so readers never see half)."""
    old = None
    if target.exists():
        old = target.parent / f".{target.name}.old-{uuid.uuid4().hex[:8]}"
        os.replace(target, old)
    try:
        os.replace(tmp, target)
    except OSError:
        if not target.exists():
            raise
        shutil.rmtree(tmp, ignore_errors=True)  # another process exported the same weights first
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def read_manifest(onnx_dir: str | Path) -> dict[str, Any]:
    """The manifest of an export directory; a UserError when there is none or it is not one."""
    path = Path(onnx_dir) / MANIFEST_FILE
    if not path.is_file():
        raise UserError(
            f"No ONNX export at {onnx_dir} (no {MANIFEST_FILE}). Export with `dreamrt export onnx policy.path=CKPT`."
        )
    try:
        manifest = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise UserError(
            f"{path} is not valid JSON ({error}); export again with `dreamrt export onnx`."
        ) from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise UserError(f"{path} is not a dreamrt ONNX manifest; export again with `dreamrt export onnx`.")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise UserError(
            f"{path} has format_version {manifest.get('format_version')!r}; this dreamrt reads {FORMAT_VERSION}. "
            "Export again with `dreamrt export onnx`."
        )
    return manifest


def export_is_current(onnx_dir: str | Path, checkpoint: str | Path, *, blocks: bool = False) -> bool:
    """Whether ``onnx_dir`` holds a complete export of ``checkpoint``'s current weights (with blocks if
    asked) whose parity error is within :data:`PARITY_TOLERANCE`."""
    from dreamrt.training.checkpoint import MODEL_FILE, read_meta

    try:
        manifest = read_manifest(onnx_dir)
    except UserError:
        return False
    if manifest.get("model_sha256") != read_meta(checkpoint).files.get(MODEL_FILE):
        return False
    if blocks and not manifest.get("blocks"):
        return False
    if not manifest.get("max_abs_error", float("inf")) <= PARITY_TOLERANCE:
        return False
    try:
        files = [manifest["graphs"][k]["file"] for k in ("encoder", "denoiser")]
        if manifest.get("blocks"):
            b = manifest["blocks"]
            files += [b[k]["file"] for k in ("condition", "head", "reuse")] + [
                s["file"] for s in b["sub_blocks"]
            ]
    except (KeyError, TypeError):
        return False  # written by another version of this module: export again
    return all((Path(onnx_dir) / f).is_file() for f in files)


def ensure_export(
    policy: DiffusionPolicy, checkpoint: str | Path, *, blocks: bool = False, opset: int = DEFAULT_OPSET
) -> Path:
    """``<checkpoint>/onnx``, exported now from the (torch) ``policy`` if missing, stale or (``blocks``)
    without the sub-block graphs. A new export always includes them: they cost about as much as
    the denoiser again, and a later ``cache=bac`` then finds them."""
    checkpoint = Path(checkpoint)
    onnx_dir = checkpoint / ONNX_DIR
    if export_is_current(onnx_dir, checkpoint, blocks=blocks):
        return onnx_dir
    if not os.access(checkpoint, os.W_OK):
        raise UserError(
            f"backend=onnxruntime needs an ONNX export in {onnx_dir}, and {checkpoint} is not writable. Export "
            f"where it can write (`dreamrt export onnx policy.path={checkpoint}` as a user who may), or copy the "
            "checkpoint somewhere writable."
        )
    print(f"dreamrt: exporting ONNX graphs of {checkpoint} to {onnx_dir}", file=sys.stderr)
    manifest = export_policy(policy, onnx_dir, checkpoint=checkpoint, opset=opset, blocks=True)
    if manifest["max_abs_error"] > PARITY_TOLERANCE:
        raise UserError(
            f"The ONNX export in {onnx_dir} differs from torch by up to {manifest['max_abs_error']:.3g} (tolerance "
            f"{PARITY_TOLERANCE}); see its manifest.json. Use backend=torch and report the model configuration."
        )
    return onnx_dir


# ---------------------------------------------------------------------------- running


class OrtObservationEncoder(nn.Module):
    """:class:`ObservationEncoder`'s call contract (an observation dict -> (B, To, O)), run by encoder.onnx.

    The torch encoder's sub-modules stay registered under their names, so the policy's
    ``state_dict`` (and a checkpoint saved from it) is unchanged; they are not run. Language
    (``task`` strings through the frozen sentence encoder) stays with the torch encoder.
    """

    def __init__(self, encoder: ObservationEncoder, session: ort.InferenceSession):
        super().__init__()
        for name, child in encoder.named_children():
            self.add_module(name, child)
        object.__setattr__(self, "_torch_encoder", encoder)  # not a sub-module: its children already are
        self.config = encoder.config
        self.session = session
        names = [i.name for i in session.get_inputs()]
        if names != list(encoder.config.input_keys):
            raise UserError(
                f"encoder.onnx takes {names}, but this policy's encoder reads {encoder.config.input_keys}: the "
                "export is of another model. Export again with `dreamrt export onnx policy.path=CKPT`."
            )

    @property
    def sentence_encoder(self) -> Any:
        return self._torch_encoder.sentence_encoder

    @sentence_encoder.setter
    def sentence_encoder(self, value: Any) -> None:
        self._torch_encoder.sentence_encoder = value

    def task_embedding(self, obs: Mapping[str, Any]) -> Tensor:
        return self._torch_encoder.task_embedding(obs)

    def forward(self, obs: Mapping[str, Any]) -> Tensor:
        cfg = self.config
        missing = [k for k in cfg.input_keys if k != TASK_EMBEDDING_KEY and k not in obs]
        if missing:
            raise UserError(
                f"Observation lacks {missing}; it has {sorted(obs)}. This encoder reads {cfg.input_keys} "
                f"({TASK_EMBEDDING_KEY} or {TASK_KEY} for language)."
            )
        feeds = {key: _numpy(obs[key]) for key in cfg.lowdim_keys}
        for cam in cfg.cameras:
            feeds[cam.key] = _image(cam, obs[cam.key])
        if cfg.use_language:
            feeds[TASK_EMBEDDING_KEY] = _numpy(self._torch_encoder.task_embedding(obs))
        return torch.from_numpy(_run(self.session, feeds, "encoder.onnx")[0])  # (B, To, O)


def _image(cam: Any, x: Any) -> np.ndarray:
    """(B, To, 3, H, W) or (B, To, H, W, 3), uint8 or float in [0, 1] -> float32 (B, To, 3, H, W) in [0, 1]."""
    x = torch.as_tensor(x)
    chw, hwc = (3, cam.height, cam.width), (cam.height, cam.width, 3)
    if x.ndim == 5 and tuple(x.shape[2:]) == hwc and tuple(x.shape[2:]) != chw:
        x = x.permute(0, 1, 4, 2, 3)
    if x.ndim != 5 or tuple(x.shape[2:]) != chw:
        raise UserError(
            f"'{cam.key}' has shape {tuple(x.shape)}; expected (B, To, 3, {cam.height}, {cam.width}) or "
            f"(B, To, {cam.height}, {cam.width}, 3) ({IMAGE_PREFIX}<camera> as the env gives it)."
        )
    if x.dtype == torch.uint8:
        return (x.float() * (1.0 / 255.0)).contiguous().numpy()
    if not x.is_floating_point():
        raise UserError(f"'{cam.key}' has dtype {x.dtype}; expected uint8 (0..255) or float (0..1).")
    return _numpy(x)


class _TimestepArrays(dict):
    """int timestep -> its (1,) int64 array, made once."""

    def __missing__(self, t: int) -> np.ndarray:
        value = self[t] = np.array([t], dtype=np.int64)
        return value


class OrtDenoiser:
    """A ``denoiser_factory`` (features (B, To, O) -> ``denoise(x_t, t)``) running denoiser.onnx per step."""

    def __init__(self, session: ort.InferenceSession):
        names = tuple(i.name for i in session.get_inputs())
        if names != DENOISER_INPUTS:
            raise UserError(f"denoiser.onnx takes {names}; expected {DENOISER_INPUTS}. Export again.")
        self.session = session
        self._timesteps = _TimestepArrays()

    def __call__(self, features: Tensor) -> Denoiser:
        f = _numpy(features)
        session, timesteps = self.session, self._timesteps

        def denoise(x: Tensor, t: int) -> Tensor:
            feeds = {"noisy_actions": _numpy(x), "timesteps": timesteps[int(t)], "obs_features": f}
            return torch.from_numpy(_run(session, feeds, "denoiser.onnx")[0])  # (B, H, A)

        return denoise


@dataclass
class OrtBlocks:
    """The sub-block graphs of an export: condition, one session per residual sub-block, head."""

    names: list[str]
    condition: Any  # ort.InferenceSession
    blocks: list[Any]
    head: Any
    reuse: Any  # a step that updates no block: head(embed(noisy_actions) + residual_sum)
    takes_memory: list[bool]  # FFN graphs have no memory input (the exporter drops unused inputs)

    @classmethod
    def load(
        cls, onnx_dir: Path, names: list[str], threads: int | None, providers: Sequence[str] | None
    ) -> OrtBlocks:
        def session(file: str) -> Any:
            return make_session(onnx_dir / file, threads, providers, spinning=False)  # see make_session

        condition = session(CONDITION_FILE)
        blocks = [session(block_file(j)) for j in range(len(names))]
        head = session(HEAD_FILE)
        reuse = session(REUSE_FILE)
        takes_memory = ["memory" in [i.name for i in s.get_inputs()] for s in blocks]
        return cls(list(names), condition, blocks, head, reuse, takes_memory)

    def full_step(self, noisy: np.ndarray, timesteps: np.ndarray, features: np.ndarray) -> np.ndarray:
        """Every block recomputed: the uncached network (the export's parity check)."""
        stream, memory = self.condition.run(None, {"noisy_actions": noisy, "timesteps": timesteps, "obs_features": features})  # fmt: skip
        for session, mem in zip(self.blocks, self.takes_memory):
            stream = (
                stream
                + session.run(None, {"stream": stream, "memory": memory} if mem else {"stream": stream})[0]
            )
        return self.head.run(None, {"stream": stream})[0]


class OrtCachedDenoiser:
    """BAC under onnxruntime: a ``denoiser_factory`` that runs a sub-block graph only at its update steps.

    A step at which some block updates runs condition.onnx (memory and the embedded
    actions), then for each sub-block its graph (the residual is kept) or the cached
    residual, then head.onnx. A step at which none updates needs neither the memory nor the
    blocks: reuse.onnx adds the sum of the cached residuals to the embedded actions and runs
    the head, one call. The same schedule semantics as
    :class:`dreamrt.runtime.bac.CachedDenoiser`, whose checks it shares; each call of the
    factory starts a fresh cache (one per chunk).
    """

    def __init__(
        self, blocks: OrtBlocks, schedule: BACSchedule, model: nn.Module, sampler: Any | None = None
    ):
        from dreamrt.runtime.bac import check_schedule

        check_schedule(schedule, model, sampler)
        if tuple(blocks.names) != schedule.blocks:
            raise UserError(
                f"The exported block graphs ({len(blocks.names)}) are not this schedule's blocks "
                f"({schedule.num_blocks}). Export again with `dreamrt export onnx policy.path=CKPT`."
            )
        self.blocks = blocks
        self.schedule = schedule
        self._table = schedule.update_table()  # (K, N) bools
        self._timesteps = _TimestepArrays()

    def __call__(self, features: Tensor) -> Denoiser:
        f = _numpy(features)
        b, table, schedule_t = self.blocks, self._table, self.schedule.timesteps
        residuals: list[np.ndarray | None] = [None] * len(b.blocks)  # (B, H, D) each once filled
        step = 0
        residual_sum: np.ndarray | None = None  # of the cached residuals; None after an update

        def denoise(x: Tensor, t: int) -> Tensor:
            nonlocal step, residual_sum
            i = step
            if i >= len(schedule_t) or int(t) != schedule_t[i]:
                self._wrong_step(i, t)
            step = i + 1
            if not any(table[i]):
                if residual_sum is None:
                    residual_sum = residuals[0]
                    for r in residuals[1:]:
                        residual_sum = residual_sum + r
                feeds = {"noisy_actions": _numpy(x), "residual_sum": residual_sum}
                return torch.from_numpy(_run(b.reuse, feeds, "blocks/reuse.onnx")[0])  # (B, H, A)
            residual_sum = None
            feeds = {"noisy_actions": _numpy(x), "timesteps": self._timesteps[int(t)], "obs_features": f}
            stream, memory = _run(b.condition, feeds, "blocks/condition.onnx")
            for j, update in enumerate(table[i]):
                if update:
                    inputs = {"stream": stream, "memory": memory} if b.takes_memory[j] else {"stream": stream}
                    residuals[j] = b.blocks[j].run(None, inputs)[0]
                stream = stream + residuals[j]  # a new array: the cached residual is never written to
            return torch.from_numpy(b.head.run(None, {"stream": stream})[0])  # (B, H, A)

        return denoise

    def _wrong_step(self, i: int, t: int) -> None:
        s = self.schedule
        if i >= s.num_steps:
            raise UserError(
                f"The sampler asked for a {i + 1}th denoiser call (timestep {t}), but the BAC schedule covers "
                f"{s.num_steps} steps. Call the denoiser factory again for each new sampling run."
            )
        raise UserError(
            f"At step {i} the sampler asked for timestep {t}, but the BAC schedule was made for the "
            f"{s.num_steps}-step {s.sampler} sampler, which runs {s.timesteps[i]} there. Use that sampler or "
            "make a schedule for this one."
        )


@dataclass
class OrtRuntime:
    """What :func:`attach_onnxruntime` plugged into a policy."""

    onnx_dir: Path
    manifest: dict[str, Any]
    providers: list[str]  # the execution providers the sessions use, in order
    encoder: OrtObservationEncoder
    denoiser: OrtDenoiser | OrtCachedDenoiser
    threads: int | None


def attach_onnxruntime(
    policy: DiffusionPolicy,
    onnx_dir: str | Path,
    *,
    threads: int | None = None,
    providers: Sequence[str] | None = None,
    schedule: BACSchedule | None = None,
) -> OrtRuntime:
    """Run ``policy``'s encoder and denoiser on onnxruntime from the export in ``onnx_dir``.

    With ``schedule`` the denoiser is BAC-cached (needs the export's block graphs). The
    sampler, the normalisation and the instruction table stay in Python. The export must
    be of this policy's weights (:func:`ensure_export` checks that for checkpoints).
    """
    onnx_dir = Path(onnx_dir)
    manifest = read_manifest(onnx_dir)
    c = policy.config
    shape = manifest["policy"]
    mine = {
        "horizon": c.horizon,
        "n_obs_steps": c.n_obs_steps,
        "action_dim": c.action_dim,
        "obs_feature_dim": c.encoder.obs_feature_dim,
    }
    theirs = {k: shape.get(k) for k in mine}
    if mine != theirs:
        raise UserError(
            f"The ONNX export in {onnx_dir} is of a model with {theirs}; this policy has {mine}. Export this "
            "checkpoint again with `dreamrt export onnx policy.path=CKPT`."
        )
    if isinstance(policy.encoder, OrtObservationEncoder):
        raise UserError("This policy already runs on onnxruntime; load it again to attach another export.")
    encoder_session = make_session(onnx_dir / ENCODER_FILE, threads, providers)
    encoder = OrtObservationEncoder(policy.encoder, encoder_session)
    if schedule is None:
        denoiser: OrtDenoiser | OrtCachedDenoiser = OrtDenoiser(
            make_session(onnx_dir / DENOISER_FILE, threads, providers)
        )
    else:
        if not manifest.get("blocks"):
            raise UserError(
                f"BAC caching on onnxruntime needs the sub-block graphs, and the export in {onnx_dir} has none. "
                "Export with `dreamrt export onnx policy.path=CKPT blocks=true`."
            )
        names = [b["name"] for b in manifest["blocks"]["sub_blocks"]]
        blocks = OrtBlocks.load(onnx_dir, names, threads, providers)
        denoiser = OrtCachedDenoiser(blocks, schedule, policy.model, policy.sampler)
    policy.encoder = encoder
    policy.denoiser_factory = denoiser
    return OrtRuntime(onnx_dir, manifest, list(encoder_session.get_providers()), encoder, denoiser, threads)
