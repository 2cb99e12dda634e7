"""Run by test_ddp.py under torchrun: train the toy policy a few steps; save this rank's weights.

python -m torch.distributed.run --standalone --nproc_per_node=2 ddp_policy_child.py STORE RUN_DIR
"""

import os
import sys
from pathlib import Path

from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).parent))
from toy_reaching import toy_config  # noqa: E402

from dreamrt.training.train_policy import train  # noqa: E402


def main() -> None:
    store, run_dir = Path(sys.argv[1]), Path(sys.argv[2])
    # 8 windows per rank per step; dropout on, so each rank's randomness matters.
    cfg = toy_config(store, steps=6, batch_size=8, log_every=2, val_every=3, save_every=3, p_drop=0.1)
    result = train(cfg, run_dir)
    rank = int(os.environ["RANK"])
    for name, model in (("raw", result.model), ("ema", result.ema_model)):
        state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
        save_file(state, str(run_dir / f"rank{rank}_{name}.safetensors"))
    print(f"rank {rank}: step {result.step}, checkpoint {result.checkpoint}", flush=True)


if __name__ == "__main__":
    main()
