"""Train with checkpoints, then resume from Python to more steps.

Shows: ``checkpoint_dir=`` and ``save_every=``; a second ``Trainer`` (a fresh model and
optimizer object, as after a restart) with a larger ``steps`` and ``train(resume=True)``
continues from the newest checkpoint, in the same MLflow run. Run it with an output folder
(default: a new temporary folder); checkpoints go to ``<out>/checkpoints``, MLflow to a
sqlite store there:

    python examples/resume_from_python.py runs/resume
    kithara-ops checkpoints runs/resume/checkpoints
"""

import sys
import tempfile
from pathlib import Path

import optax

from kithara_ops import Trainer, data, models


def trainer(out: Path, steps: int) -> Trainer:
    return Trainer(
        models.causal_lm("tiny", seq_len=32),
        optax.adamw(1e-3),
        data.load("synthetic", seq_len=32, batch_size=8, seed=0),
        steps=steps,
        log_every=2,
        checkpoint_dir=str(out / "checkpoints"),
        save_every=2,
        tracking_uri=f"sqlite:///{out.resolve()}/mlflow.db",
        experiment="resume",
        system_metrics=False,
    )


def main() -> None:
    out = Path(sys.argv[1] if len(sys.argv) > 1 else tempfile.mkdtemp(prefix="kithara-ops-"))
    out.mkdir(parents=True, exist_ok=True)

    first = trainer(out, steps=4).train()
    print(f"first run: step {first.step}, run id {first.run_id}")

    resumed = trainer(out, steps=8).train(resume=True)  # from the step-4 checkpoint
    print(f"resumed run: step {resumed.step}, run id {resumed.run_id}")
    if resumed.step != 8 or resumed.run_id != first.run_id:
        sys.exit(f"expected step 8 in run {first.run_id}, got {resumed.step} in {resumed.run_id}")
    print(f"checkpoints: {out / 'checkpoints'}")


if __name__ == "__main__":
    main()
