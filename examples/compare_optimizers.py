"""Train one Keras and one Optax optimizer into one experiment, then compare the two runs.

Shows: the same ``Trainer`` with ``keras.optimizers.AdamW`` and ``optax.adamw`` (same model
size, data order and seed), both tracked into the experiment ``compare``, then
``kithara_ops.tracking.compare``: the runs best first, the table ``kithara-ops compare``
prints, and the same runs as JSON. Run it with an output folder (default: a new temporary
folder); MLflow writes to a sqlite store there:

    python examples/compare_optimizers.py runs/compare
    kithara-ops compare --tracking-uri sqlite:///runs/compare/mlflow.db --experiment compare
"""

import json
import os
import sys
import tempfile
from pathlib import Path

# Keras picks its backend when first imported: here before kithara_ops, so set it first.
os.environ.setdefault("KERAS_BACKEND", "jax")

import keras
import optax

from kithara_ops import Trainer, data, models
from kithara_ops.tracking.compare import compare_runs
from kithara_ops.tracking.compare_table import print_table


def main() -> None:
    out = Path(sys.argv[1] if len(sys.argv) > 1 else tempfile.mkdtemp(prefix="kithara-ops-"))
    out.mkdir(parents=True, exist_ok=True)
    tracking_uri = f"sqlite:///{out.resolve()}/mlflow.db"

    optimizers = {
        "keras-adamw": keras.optimizers.AdamW(learning_rate=1e-3, weight_decay=0.01),
        "optax-adamw": optax.adamw(1e-3, weight_decay=0.01),
    }
    for name, optimizer in optimizers.items():
        model = models.causal_lm("tiny", seq_len=32)  # same seed: same initial weights
        train = data.load("synthetic", seq_len=32, batch_size=8, seed=0)
        result = Trainer(
            model,
            optimizer,
            train,
            steps=6,
            log_every=2,
            seed=0,
            tracking_uri=tracking_uri,
            experiment="compare",
            run_name=name,
            system_metrics=False,
        ).train()
        print(f"{name}: run id {result.run_id}, loss {result.loss:.4f}")

    runs = compare_runs("compare", tracking_uri=tracking_uri, metric="loss")
    print_table(runs, "loss")  # the table `kithara-ops compare` prints
    print(json.dumps([run.to_dict() for run in runs], indent=2))  # what `compare --json` prints


if __name__ == "__main__":
    main()
