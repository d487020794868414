"""Arguments of ``kvpolicy train-tiny`` (kept apart from ``train_tiny`` so the parser stays light)."""

from __future__ import annotations


def add_train_tiny_arguments(p) -> None:
    p.add_argument("--out", default="runs/train-tiny",
                   help="folder for the weights (weights/<preset>/), log.jsonl, loss.png and run.json")
    p.add_argument("--seed", type=int, default=0, help="training seed (the shipped weights: 0)")
    p.add_argument("--stages", default="bsq,vq,infinity,var",
                   help="comma-separated subset of bsq,vq,infinity,var; infinity needs bsq and var needs vq "
                        "(their tokenizers are trained in the same run)")
    p.add_argument("--steps-scale", type=float, default=1.0,
                   help="multiply every stage's number of steps (the shipped weights: 1.0)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1; the shipped weights: 1)")
    p.add_argument("--jobs", type=int, default=2,
                   help="2 (default): train the two models side by side in two processes, each with --threads "
                        "threads; 1: one after the other (the same weights either way)")
    p.add_argument("--install", action="store_true",
                   help="copy the trained weights into the package (adapters/tiny_weights), replacing the shipped ones")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
