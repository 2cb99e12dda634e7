"""`dreamrt demo`: a one-minute look at the system: the scripted expert on a few evaluation chains.

    dreamrt demo [num_chains=5] [videos=1] [policy=expert] [--out DIR]

Runs ``dreamrt eval`` with small defaults (5 chains, one video), prints SR_1..SR_5 and the
average length, and says where the video, chart and results went. (Issue #3 version: the
learned policy under the real-time loop will take the expert's place.)
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

from dreamrt.jobs import JobResult
from dreamrt.sim.evaluate import EvalConfig, evaluate, format_summary


@dataclass
class DemoConfig(EvalConfig):
    """``EvalConfig`` with demo-sized defaults."""

    num_chains: int = 5
    videos: int = 1


def run(cfg: DemoConfig, out_dir: Path | None = None) -> JobResult:
    if out_dir is None:  # called outside the CLI: still leave the video somewhere to look at
        out_dir = Path(tempfile.mkdtemp(prefix="dreamrt_demo_"))
    name = cfg.policy.path or cfg.policy.name
    print(f"dreamrt demo: policy {name} on {cfg.num_chains} CALVIN-style chains in scene {cfg.env.scene}")
    summary, interrupted = evaluate(cfg, out_dir)
    print(format_summary(summary))
    videos = summary.get("artifacts", {}).get("videos", [])
    if videos:
        print(f"watch the rollout: {videos[0]}")
    return JobResult(summary=summary, exit_code=130 if interrupted else 0)
