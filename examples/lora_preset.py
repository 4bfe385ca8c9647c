"""Fine-tune a KerasHub preset with LoRA (rank 4), offline, on a preset built here.

Shows: a tiny GPT-2 causal LM built from config with KerasHub and written with its own
``save_to_preset`` (2 layers, hidden width 32, a byte-level vocabulary: nothing is
downloaded), loaded back with ``models.from_preset(folder, lora_rank=4)`` and trained for a
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

MERGES = ["Ġ t", "h e", "Ġt he"]
"""A few byte-pair merges (``Ġ`` is GPT-2's character for a space)."""


def byte_level_vocabulary() -> dict[str, int]:
    """End-of-text (id 0), GPT-2's printable character for each byte, then the merges."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    chars, extra = {b: chr(b) for b in printable}, 0
    for b in range(256):
        if b not in chars:
            chars[b], extra = chr(256 + extra), extra + 1
    vocabulary = {"<|endoftext|>": 0}
    for b in sorted(chars):
        vocabulary[chars[b]] = len(vocabulary)
    for merge in MERGES:
        vocabulary[merge.replace(" ", "")] = len(vocabulary)
    return vocabulary


def write_tiny_gpt2_preset(folder: Path) -> Path:
    """A 2-layer GPT-2 with its tokenizer and preprocessor, saved as a KerasHub preset."""
    import keras
    import keras_hub.models as hub

    keras.utils.set_random_seed(0)
    tokenizer = hub.GPT2Tokenizer(vocabulary=byte_level_vocabulary(), merges=MERGES)
    backbone = hub.GPT2Backbone(
        vocabulary_size=320,
        num_layers=2,
        num_heads=4,
        hidden_dim=32,
        intermediate_dim=64,
        dropout=0.0,
        max_sequence_length=128,
    )
    preprocessor = hub.GPT2CausalLMPreprocessor(tokenizer, sequence_length=32)
    hub.GPT2CausalLM(backbone, preprocessor).save_to_preset(str(folder))
    return folder


def main() -> None:
    out = Path(sys.argv[1] if len(sys.argv) > 1 else tempfile.mkdtemp(prefix="kithara-ops-"))
    out.mkdir(parents=True, exist_ok=True)
    preset = write_tiny_gpt2_preset(out / "gpt2")
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
