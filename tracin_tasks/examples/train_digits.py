"""A real training run on real data, logged to MLflow the way an audit needs it.

scikit-learn's digits (1,797 8×8 images, 10 classes) with a documented share of labels flipped
uniformly to another class (default 10%, seed 0). The flips are recorded as a separate artifact,
``ground_truth/flipped_rows.parquet`` (row_id, given_label, true_label), so an audit can be
scored; the audit itself never reads it. A small CNN is trained with SGD (momentum 0.9, cosine
decay) and a checkpoint is logged every epoch with :mod:`tracin_tasks.mlflow`.

    python -m tracin_tasks.examples.train_digits --tracking-uri sqlite:///mlflow.db
"""

from __future__ import annotations

import argparse
import os
import tempfile

import numpy as np
import pandas as pd
import torch

from tracin_tasks.examples.digits import load_noisy_digits, train_with_checkpoints
from tracin_tasks.exceptions import require_extra

FACTORIES = {"cnn": "tracin_tasks.examples.digits:build_cnn", "mlp": "tracin_tasks.examples.digits:build_mlp"}


def train_digits_run(
    tracking_uri: str | None = None,
    experiment: str = "tracin-digits",
    noise: float = 0.1,
    epochs: int = 20,
    seed: int = 0,
    model: str = "cnn",
    learning_rate: float = 0.05,
    batch_size: int = 64,
) -> str:
    """Train on noisy digits, log everything to MLflow, and return the run id."""
    mlflow = require_extra("mlflow", "mlflow")
    import tracin_tasks.mlflow as tm
    from tracin_tasks.integrations.mlflow.source import build_from_factory

    if tracking_uri:
        mlflow.set_tracking_uri(tracking_uri)
    mlflow.set_experiment(experiment)
    data = load_noisy_digits(noise=noise, seed=seed)
    torch.manual_seed(seed)
    net = build_from_factory(FACTORIES[model], {})
    with mlflow.start_run(run_name=f"digits-{model}-noise{noise:g}-seed{seed}") as run:
        mlflow.log_params(
            {"model": model, "noise": noise, "epochs": epochs, "seed": seed, "learning_rate": learning_rate,
             "batch_size": batch_size, "optimizer": "SGD(momentum=0.9)+cosine"}
        )
        tm.log_training_data(data.frame(), label_column="label", row_id_column="row_id", input_shape=(1, 8, 8),
                             name="digits")
        tm.log_model_factory(FACTORIES[model])
        flips = pd.DataFrame(
            {"row_id": data.row_id[data.flipped], "given_label": data.labels[data.flipped],
             "true_label": data.true_labels[data.flipped]}
        )
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "flipped_rows.parquet")
            flips.to_parquet(path, index=False)
            mlflow.log_artifact(path, "ground_truth")

        def log(model_: torch.nn.Module, epoch: int, lr: float) -> None:
            tm.log_checkpoint(model_, step=epoch, learning_rate=lr)

        train_with_checkpoints(net, data.dataset(), epochs=epochs, learning_rate=learning_rate,
                               batch_size=batch_size, seed=seed, on_checkpoint=log)
        with torch.no_grad():
            pred = net(torch.from_numpy(data.images)).argmax(1).numpy()
        mlflow.log_metrics(
            {"accuracy_given_labels": float(np.mean(pred == data.labels)),
             "accuracy_true_labels": float(np.mean(pred == data.true_labels)),
             "flipped_rows": int(data.flipped.sum())}
        )
        return run.info.run_id


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tracking-uri", default=None, help="MLflow tracking URI (default: MLflow's default)")
    parser.add_argument("--experiment", default="tracin-digits")
    parser.add_argument("--noise", type=float, default=0.1, help="share of labels flipped (default 0.1)")
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--model", choices=sorted(FACTORIES), default="cnn")
    args = parser.parse_args(argv)
    run_id = train_digits_run(args.tracking_uri, args.experiment, args.noise, args.epochs, args.seed, args.model)
    print(run_id)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
