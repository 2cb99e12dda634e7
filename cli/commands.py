"""The table of `dreamrt` subcommands.

Each command names its Hydra config (``configs/<config>.yaml``), the dataclass that types
and validates it, and the job function that runs it. Modules are imported only when their
command runs, so ``dreamrt --help`` stays fast.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Command:
    name: str  # words typed after `dreamrt`, e.g. "episodes info"
    summary: str
    config: str  # config name under configs/
    schema: str  # "module:Dataclass" typing the composed config
    job: str  # "module:function" with signature run(cfg, out_dir) -> JobResult | None
    positional: tuple[str, ...] = ()  # config keys filled by positional arguments, in order
    writes_outputs: bool = True  # False for read-only inspection commands (no output dir)


COMMANDS: tuple[Command, ...] = (
    Command(
        name="episodes info",
        summary="Summarise an episode store: episodes, frames, features, tasks, size on disk.",
        config="episodes_info",
        schema="dreamrt.episodes.inspect:InfoConfig",
        job="dreamrt.episodes.inspect:run_info",
        positional=("path",),
        writes_outputs=False,
    ),
    Command(
        name="episodes verify",
        summary="Check every invariant of an episode store; exit 1 with what is wrong.",
        config="episodes_verify",
        schema="dreamrt.episodes.inspect:VerifyConfig",
        job="dreamrt.episodes.inspect:run_verify",
        positional=("path",),
        writes_outputs=False,
    ),
    Command(
        name="episodes merge",
        summary="Append several episode stores (e.g. parallel recordings) into one: out=PATH sources=[A,B].",
        config="episodes_merge",
        schema="dreamrt.episodes.merge:MergeConfig",
        job="dreamrt.episodes.merge:run",
    ),
    Command(
        name="bench episodes",
        summary="Episode store write and training-window read throughput vs an in-memory copy.",
        config="bench_episodes",
        schema="dreamrt.episodes.bench:BenchEpisodesConfig",
        job="dreamrt.episodes.bench:run",
    ),
    Command(
        name="eval",
        summary="CALVIN long-horizon evaluation (SR1..SR5, average length) with videos and a per-task chart.",
        config="eval",
        schema="dreamrt.sim.evaluate:EvalConfig",
        job="dreamrt.sim.evaluate:run",
    ),
    Command(
        name="eval compare",
        summary="Two evaluations of the same episodes, paired: the change in average length (or success) with its standard error, per task.",
        config="eval_compare",
        schema="dreamrt.sim.compare:CompareConfig",
        job="dreamrt.sim.compare:run",
        positional=("baseline", "candidate"),
        writes_outputs=False,
    ),
    Command(
        name="record",
        summary="Record demonstrations (scripted expert by default) into an episode store: out=PATH episodes=N.",
        config="record",
        schema="dreamrt.sim.record:RecordConfig",
        job="dreamrt.sim.record:run",
    ),
    Command(
        name="demo",
        summary="The shipped policy on CALVIN-style chains under the real-time loop: SR1..SR5, latency table, video and latency plot (under 5 min).",
        config="demo",
        schema="dreamrt.runtime.demo:DemoConfig",
        job="dreamrt.runtime.demo:run",
    ),
    Command(
        name="train",
        summary="Train a DP-T diffusion policy on an episode store (checkpoints, metrics.csv, curves.png).",
        config="train",
        schema="dreamrt.training.train_policy:TrainConfig",
        job="dreamrt.training.train_policy:run",
        positional=("dataset.path",),
    ),
    Command(
        name="label-tasks",
        summary="Label a language policy's instructions with their tasks (for instruction grounding) from a store.",
        config="label_tasks",
        schema="dreamrt.training.label_tasks:LabelTasksConfig",
        job="dreamrt.training.label_tasks:run",
        writes_outputs=False,
    ),
    Command(
        name="interpolate",
        summary="Blend two checkpoints of one policy network: weights (1 - alpha) * base + alpha * other (e.g. a fine-tune and its start).",
        config="interpolate",
        schema="dreamrt.training.interpolate:InterpolateConfig",
        job="dreamrt.training.interpolate:run",
        writes_outputs=False,
    ),
    Command(
        name="bac calibrate",
        summary="Record sub-block outputs over a sampler's steps and write a BAC caching schedule (bac_schedule.json).",
        config="bac_calibrate",
        schema="dreamrt.runtime.bac_calibrate:CalibrateConfig",
        job="dreamrt.runtime.bac_calibrate:run",
    ),
    Command(
        name="bench sim",
        summary="CALVIN-style env steps/s with and without cameras, and the wall time of an evaluation.",
        config="bench_sim",
        schema="dreamrt.sim.bench:BenchSimConfig",
        job="dreamrt.sim.bench:run",
    ),
    Command(
        name="run",
        summary="Run a policy in the sim under the fixed-rate real-time loop, with a live status line.",
        config="run",
        schema="dreamrt.runtime.run_job:RunConfig",
        job="dreamrt.runtime.run_job:run",
    ),
    Command(
        name="export onnx",
        summary="Export a policy checkpoint's observation encoder and one denoiser step to ONNX.",
        config="export_onnx",
        schema="dreamrt.runtime.export_job:ExportConfig",
        job="dreamrt.runtime.export_job:run",
    ),
    Command(
        name="bench policy",
        summary="Per-chunk latency p50/p99 and success per sampler, step count, cache and backend.",
        config="bench_policy",
        schema="dreamrt.runtime.bench_policy:BenchPolicyConfig",
        job="dreamrt.runtime.bench_policy:run",
    ),
    Command(
        name="distill",
        summary="Consistency-distil a trained DP-T into a 1-3 step student checkpoint.",
        config="distill",
        schema="dreamrt.training.distill:DistillConfig",
        job="dreamrt.training.distill:run",
    ),
    Command(
        name="bench network",
        summary="One DP-T denoiser pass: dreamrt vs a reference-style nn.TransformerDecoder baseline, torch and onnxruntime, same run.",
        config="bench_network",
        schema="dreamrt.runtime.bench_network:BenchNetworkConfig",
        job="dreamrt.runtime.bench_network:run",
    ),
    Command(
        name="bench training",
        summary="One DP-T training step per network, batch size and optimizer (fused AdamW vs torch's default), same run: ms/step, steps/s, windows/s.",
        config="bench_training",
        schema="dreamrt.training.bench:BenchTrainingConfig",
        job="dreamrt.training.bench:run",
    ),
    Command(
        name="bench loop",
        summary="The real-time loop for many ticks at 30 Hz, idle and with a CPU hog: deadline misses, tick jitter, inference latency.",
        config="bench_loop",
        schema="dreamrt.runtime.bench_loop:BenchLoopConfig",
        job="dreamrt.runtime.bench_loop:run",
    ),
    Command(
        name="bench chunking",
        summary="Chunk strategies (sync/naive_async/temporal_ensemble/rtc) under injected inference delays: success and action jumps at chunk boundaries.",
        config="bench_chunking",
        schema="dreamrt.runtime.bench_chunking:BenchChunkingConfig",
        job="dreamrt.runtime.bench_chunking:run",
    ),
    Command(
        name="train world-model",
        summary="Train the world model's frame tokenizer and next-frame dynamics on an episode store (stage=both|tokenizer|dynamics).",
        config="train_world_model",
        schema="dreamrt.world_models.train:TrainWorldModelConfig",
        job="dreamrt.world_models.train:run",
        positional=("store",),
    ),
    Command(
        name="distill world-model",
        summary="Consistency-distil a trained world-model dynamics run into a 1-2 step student (teacher=RUN store=STORE).",
        config="distill_world_model",
        schema="dreamrt.world_models.distill:WorldModelDistillConfig",
        job="dreamrt.world_models.distill:run",
    ),
    Command(
        name="bench world-model",
        summary="World-model frames/s per sampler, steps, KV cache and speculation, with PSNR/SSIM at horizons 1/4/16 vs repeating the last frame.",
        config="bench_world_model",
        schema="dreamrt.world_models.bench:BenchWorldModelConfig",
        job="dreamrt.world_models.bench:run",
    ),
    Command(
        name="compare world-model",
        summary="Replay expert actions through MuJoCo and the world model: PSNR/SSIM per horizon and a comparison image.",
        config="compare_world_model",
        schema="dreamrt.world_models.compare:CompareWorldModelConfig",
        job="dreamrt.world_models.compare:run",
    ),
)


def by_name() -> dict[str, Command]:
    return {command.name: command for command in COMMANDS}
