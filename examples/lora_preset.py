"""Fine-tune a KerasHub preset with LoRA (rank 4), offline, on a preset built here.

Shows: a tiny GPT-2 causal LM built from config with KerasHub and written with its own
``save_to_preset`` by ``models.tiny_preset`` (2 layers, hidden width 32, a byte-level
vocabulary: nothing is downloaded), loaded back with ``models.from_preset(folder, lora_rank=4)`` and trained for a
few steps on text tokenized by the preset's own tokenizer. Only the adapters are trained and
checkpointed. Needs the ``hub`` extra (``pip install 'kithara-ops[hub]'``, which pulls
TensorFlow). Run it with an output folder (default: a new temporary folder):

    python examples/lora_preset.py runs/lora
    kithara-ops checkpoints runs/lora/checkpoints
    kithara-ops train --model runs/lora/gpt2 --data synthetic --lora-rank 4 --seq-len 32 --steps 4
"""

import sys
import tempfile
from pathlib import Path

import optax

from kithara_ops import Trainer, data, models


def main() -> None:
    out = Path(sys.argv[1] if len(sys.argv) > 1 else tempfile.mkdtemp(prefix="kithara-ops-"))
    out.mkdir(parents=True, exist_ok=True)
    preset = models.tiny_preset("gpt2", out)
    print(f"preset: {preset}")

    model = models.from_preset(str(preset), lora_rank=4)
    tokenizer = models.preset_tokenizer(str(preset))
    train = data.load("synthetic", seq_len=32, batch_size=8, seed=0, tokenizer=tokenizer)
    trainable = sum(v.numpy().size for v in model.trainable_variables)
    print(f"trainable parameters (LoRA adapters): {trainable}")

    result = Trainer(
        model,
        optax.adamw(1e-3),
        train,
        steps=4,
        log_every=2,
        checkpoint_dir=str(out / "checkpoints"),
        save_every=4,
        tracking_uri=f"sqlite:///{out.resolve()}/mlflow.db",
        experiment="lora",
        system_metrics=False,
    ).train()
    print(f"step: {result.step}")
    print(f"loss: {result.loss:.4f}")
    print(f"run id: {result.run_id}")


if __name__ == "__main__":
    main()
