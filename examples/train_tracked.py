"""Train the built-in ``tiny`` model for a few steps and log the run to MLflow.

Shows: ``Trainer`` with a tracking URI and an experiment name; ``train()`` returns the MLflow
run id. Run it with an output folder (default: a new temporary folder) and, optionally, a
tracking URI (default: a sqlite store in the output folder):

    python examples/train_tracked.py runs/tracked
    python examples/train_tracked.py runs/tracked http://127.0.0.1:5000
    mlflow ui --backend-store-uri sqlite:///runs/tracked/mlflow.db   # then open the run
"""

import sys
import tempfile
from pathlib import Path

import optax

from kithara_ops import Trainer, data, models


def main() -> None:
    out = Path(sys.argv[1] if len(sys.argv) > 1 else tempfile.mkdtemp(prefix="kithara-ops-"))
    out.mkdir(parents=True, exist_ok=True)
    tracking_uri = sys.argv[2] if len(sys.argv) > 2 else f"sqlite:///{out.resolve()}/mlflow.db"

    model = models.causal_lm("tiny", seq_len=32)
    train = data.load("synthetic", seq_len=32, batch_size=8, seed=0)
    trainer = Trainer(
        model,
        optax.adamw(1e-3),
        train,
        steps=6,
        log_every=2,
        tracking_uri=tracking_uri,
        experiment="examples",
        run_name="train-tracked",
        system_metrics=False,
    )
    result = trainer.train()
    print(f"step: {result.step}")
    print(f"loss: {result.loss:.4f}")
    print(f"tracking uri: {tracking_uri}")
    print(f"run id: {result.run_id}")


if __name__ == "__main__":
    main()
