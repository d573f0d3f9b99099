"""End-to-end demo: train on digits with 10% flipped labels, then find the flips with TracIn.

Run with ``python -m tracin_tasks.demo`` (``make demo`` sets everything up first).
"""

from __future__ import annotations

import argparse
import logging
import time

import numpy as np
import torch

from tracin_tasks import TracIn
from tracin_tasks.examples.digits import build_cnn, load_noisy_digits, recall_at, train_with_checkpoints


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--noise", type=float, default=0.1, help="share of labels to flip (default 0.1)")
    parser.add_argument("--epochs", type=int, default=20, help="training epochs, one checkpoint each")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.manual_seed(args.seed)

    data = load_noisy_digits(noise=args.noise, seed=args.seed)
    n, n_flipped = len(data.labels), int(data.flipped.sum())
    print(f"digits: {n} rows, {n_flipped} labels flipped ({args.noise:.0%}), recorded as ground truth")

    t0 = time.perf_counter()
    model = build_cnn()
    checkpoints = train_with_checkpoints(model, data.dataset(), epochs=args.epochs, seed=args.seed)
    acc = (model(torch.from_numpy(data.images)).argmax(1).numpy() == data.true_labels).mean()
    print(
        f"trained a CNN for {args.epochs} epochs in {time.perf_counter() - t0:.1f}s; "
        f"{len(checkpoints)} checkpoints, lr {checkpoints[0].learning_rate:.3g} -> "
        f"{checkpoints[-1].learning_rate:.3g}; accuracy against the true labels {acc:.3f}"
    )

    t0 = time.perf_counter()
    scores = TracIn(model, checkpoints).self_influence(data.dataset(), batch_size=256)
    print(f"self-influence of {n} rows over {len(checkpoints)} checkpoints in {time.perf_counter() - t0:.1f}s")

    for share in (0.10, 0.20):
        print(f"flipped rows found in the top {share:.0%} by self-influence: {recall_at(scores, data.flipped, share):.1%}")
    order = np.argsort(-scores)[:5]
    print("most suspicious rows (row_id: given label -> true label):")
    for i in order:
        print(f"  {data.row_id[i]}: {data.labels[i]} -> {data.true_labels[i]}{'  (flipped)' if data.flipped[i] else ''}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
