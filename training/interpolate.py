"""`dreamrt interpolate`: a policy whose weights lie between two checkpoints of one network.

    dreamrt interpolate base=CKPT other=CKPT alpha=0.5 out=DIR

Every learnt tensor becomes ``(1 - alpha) * base + alpha * other``. This is how a fine-tune is
blended back into the model it started from (weight-space ensembling, as in WiSE-FT): the
two must share their architecture, and in practice their initialisation, or the average of
their weights is not a network that does anything. The output is an ordinary checkpoint with
the base's config (instructions, task labels, sampler) and normaliser.

What is not learnt comes from the base: the instruction table (embeddings of fixed strings,
in the order of the base's config), whose rows must agree with the other's wherever both hold
the same instruction. Files that depend on the weights (a BAC schedule, an ONNX export) are not
carried over; make them again for the new weights.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from dreamrt.errors import UserError
from dreamrt.jobs import JobResult

INSTRUCTION_TABLE = "instruction_embeddings"


@dataclass
class InterpolateConfig:
    base: str = ""  # the checkpoint whose config and normaliser the result keeps (or shipped:<name>)
    other: str = ""  # the checkpoint to blend in, e.g. a fine-tune of base
    alpha: float = 0.5  # 0: base's weights; 1: other's
    out: str = ""  # the new checkpoint directory (must not exist)

    def __post_init__(self) -> None:
        for name in ("base", "other", "out"):
            if not getattr(self, name):
                raise UserError(
                    f"interpolate needs {name}=...: dreamrt interpolate base=CKPT other=CKPT out=DIR."
                )
        self.alpha = float(self.alpha)
        if not (math.isfinite(self.alpha) and 0.0 <= self.alpha <= 1.0):
            raise UserError(
                f"alpha={self.alpha!r}; expected a number in [0, 1] (0 keeps base, 1 takes other)."
            )


def interpolate_policies(base_path: str, other_path: str, alpha: float, out: str | Path) -> Path:
    """Write the checkpoint whose learnt tensors are ``(1 - alpha) * base + alpha * other``; return its path."""
    import torch

    from dreamrt.policies.diffusion_policy import POLICY_KIND, DiffusionPolicyConfig
    from dreamrt.policies.shipped import resolve_policy_path
    from dreamrt.training.checkpoint import config_from_dict, load_checkpoint, save_checkpoint

    base = load_checkpoint(resolve_policy_path(base_path), kind=POLICY_KIND)
    other = load_checkpoint(resolve_policy_path(other_path), kind=POLICY_KIND)
    base_cfg = config_from_dict(DiffusionPolicyConfig, base.config, source=f"{base.path}/config.yaml")
    other_cfg = config_from_dict(DiffusionPolicyConfig, other.config, source=f"{other.path}/config.yaml")
    for part in ("encoder", "model", "noise"):
        if getattr(base_cfg, part) != getattr(other_cfg, part):
            raise UserError(
                f"{base.path} and {other.path} are different networks (their '{part}' configs differ); only "
                "checkpoints of one architecture, e.g. a model and its fine-tune, can be interpolated."
            )
    if base.normalizer != other.normalizer:
        raise UserError(
            f"{base.path} and {other.path} normalise their inputs differently, so the same weight means different "
            "things in each; interpolate a model with a fine-tune that kept its normaliser (init_from= does)."
        )
    if base.model_state.keys() != other.model_state.keys():
        only = sorted(set(base.model_state) ^ set(other.model_state))
        raise UserError(f"{base.path} and {other.path} hold different tensors (e.g. {only[:3]}).")

    state = {}
    for name, a in base.model_state.items():
        b = other.model_state[name]
        if name == INSTRUCTION_TABLE:  # one row per instruction of each config: sizes may differ
            _check_tables_agree(base_cfg.instructions, a, other_cfg.instructions, b)
            state[name] = a
        elif a.shape != b.shape:
            raise UserError(
                f"'{name}' has shape {tuple(a.shape)} in {base.path} and {tuple(b.shape)} in {other.path}."
            )
        elif not a.is_floating_point():
            if not torch.equal(a, b):
                raise UserError(
                    f"'{name}' (not a learnt weight) differs between {base.path} and {other.path}."
                )
            state[name] = a
        else:
            state[name] = (1 - alpha) * a + alpha * b.to(a.dtype)
    return save_checkpoint(
        out,
        model_state=state,
        config=base.config,
        normalizer=base.normalizer,
        step=base.step,
        kind=POLICY_KIND,
    )


def _check_tables_agree(base_rows: list[str], base_table, other_rows: list[str], other_table) -> None:
    """The two instruction tables embed the same strings alike (same sentence encoder); row order may differ."""
    import torch

    row_in_other = {text: i for i, text in enumerate(other_rows)}
    pairs = [(i, row_in_other[text]) for i, text in enumerate(base_rows) if text in row_in_other]
    if not pairs:
        return
    ours, theirs = zip(*pairs)
    if not torch.allclose(base_table[list(ours)], other_table[list(theirs)], atol=1e-4):
        raise UserError(
            "The two checkpoints embed the same instructions differently (another sentence encoder?), so their "
            "networks read language differently; they cannot be interpolated."
        )


def run(cfg: InterpolateConfig, out_dir: Path | None) -> JobResult:
    target = Path(cfg.out)
    if target.exists():
        raise UserError(f"out={target} already exists; choose a new directory.")
    path = interpolate_policies(cfg.base, cfg.other, cfg.alpha, target)
    print(
        f"wrote {path}: (1 - {cfg.alpha:g}) x {cfg.base} + {cfg.alpha:g} x {cfg.other}. A BAC schedule or ONNX "
        "export of either does not apply to it: `dreamrt bac calibrate` / `dreamrt export onnx` again."
    )
    return JobResult(
        summary={"checkpoint": str(path), "base": cfg.base, "other": cfg.other, "alpha": cfg.alpha}
    )
