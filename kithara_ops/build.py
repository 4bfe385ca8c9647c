"""From a ``RunConfig`` to the live objects of a run: model, optimizer, data, Trainer."""

from __future__ import annotations

from collections.abc import Sequence

import keras

from kithara_ops import data, models
from kithara_ops.callbacks import Callback
from kithara_ops.config import RunConfig
from kithara_ops.optim.spec import build_optimizer
from kithara_ops.trainer import Trainer


def build_trainer(config: RunConfig, callbacks: Sequence[Callback] = ()) -> Trainer:
    """Everything a config names, built and handed to a ``Trainer``.

    Data is read before the model is built so a bad path fails in a second, not after
    compilation. ``keras.utils.set_random_seed(config.seed)`` makes the initial weights a
    function of the seed alone.
    """
    optimizer = build_optimizer(config.optimizer, config.learning_rate, config.weight_decay)
    tokenizer = data.ByteTokenizer()
    train_data = data.load(
        config.data, seq_len=config.seq_len, batch_size=config.batch_size, seed=config.seed
    )
    eval_data = None
    if config.eval_data is not None:
        eval_data = data.load(
            config.eval_data,
            seq_len=config.seq_len,
            batch_size=config.batch_size,
            shuffle=False,
            repeat=False,
        )
    keras.utils.set_random_seed(config.seed)
    model = models.resolve_model(
        config.model,
        vocab_size=tokenizer.vocab_size,
        seq_len=config.seq_len,
        dtype=config.precision if config.precision != "float32" else None,
    )
    return Trainer(
        model, optimizer, train_data, eval_data=eval_data, config=config, callbacks=callbacks
    )
