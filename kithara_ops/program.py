"""``Program``: a run built once, before any loop exists.

A program holds what does not change while a run trains: the optimizer and model adapters,
the optimizer's description, the mesh and the sharding of every state array, the key groups,
the compiled train and eval steps, and the base model's record. It answers what a start needs
(``fresh_state()``, ``template()``) and what the loop needs (the steps, the batch sharding),
so that export, migration, a dry run and tests use it without a Trainer.

Nothing is placed on the devices when a program is built: the steps are compiled on their
first call and the state template is abstract (shapes, dtypes and shardings only).
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Sequence
from typing import Any

import jax
import keras

from kithara_ops import state as state_lib
from kithara_ops.checkpoint.restore import StateTemplate
from kithara_ops.config import RunConfig
from kithara_ops.errors import ConfigError
from kithara_ops.models import layout_rules_of
from kithara_ops.models.adapter import adapt_model, check_trainable, written_in_training
from kithara_ops.models.hub import base_model_of, draw_lora, lora_seeded
from kithara_ops.optim import as_adapter
from kithara_ops.optim.describe import describe_optimizer
from kithara_ops.sharding import LayoutRule, as_layout_rules, batch_sharding, make_mesh
from kithara_ops.state import TrainState
from kithara_ops.step import StepBuilder, compile_steps


def require_built(model: Any) -> None:
    """Refuse, in one line, anything but a ``keras.Model`` whose variables exist."""
    if not isinstance(model, keras.Model):
        raise ConfigError(f"model must be a keras.Model, got {type(model).__name__}.")
    if not model.trainable_variables:
        raise ConfigError(
            f"model {model.name!r} has no variables yet: build it (call it on a batch) first."
        )


class Program:
    """A model, an optimizer and a config, built into compiled steps on a mesh.

    Args:
      model: a built ``keras.Model`` mapping token ids ``(batch, seq)`` to logits.
      optimizer: a ``keras.optimizers.Optimizer`` or an ``optax.GradientTransformation``.
      config: the run's final ``RunConfig`` (sharding, precision, accumulation, seed, ...).
      layout_rules: ``[(regex, spec), ...]`` or a Keras ``LayoutMap`` placing parameters and
        frozen weights under ``fsdp``; defaults to ``model.get_layout_rules()`` when the model
        has it, else a size-based rule.
      devices: devices for the mesh (default: ``sharding.default_devices()``).
      description: the optimizer's description, where the caller has it already.
      given: which of the config's ``model``, ``data``, ``optimizer`` hold the label of a
        Python object (see ``config.OBJECT_FIELDS``), not a spec.

    Attributes:
      model, config, adapter (the optimizer adapter), model_adapter, description (the
      optimizer's, computed once), mesh, key_groups, state_shardings, batch_sharding, steps
      (the compiled ``init_optimizer``, ``train_step`` and ``eval_step``), base_model (the
      preset's record, or ``None``), given.
    """

    def __init__(
        self,
        model: keras.Model,
        optimizer: Any,
        config: RunConfig,
        *,
        layout_rules: Sequence[LayoutRule] | Any = None,
        devices: Sequence | None = None,
        description: dict[str, Any] | None = None,
        given: frozenset[str] = frozenset(),
    ):
        require_built(model)
        self.model, self.config, self.given = model, config, frozenset(given)
        self.adapter = as_adapter(optimizer, model.trainable_variables)
        self.description = description or describe_optimizer(self.adapter.optimizer)
        # Before anything is compiled: a model that cannot give logits fails in one line.
        self.model_adapter = adapt_model(model)
        check_trainable(model, self.model_adapter, config.seq_len)
        self.base_model = base_model_of(model)
        if (self.base_model or {}).get("lora_rank") and not lora_seeded(model):
            # Keras drew LoRA's A matrices from its global state: the run's seed decides.
            draw_lora(model, config.seed)
        self.mesh = make_mesh(config.sharding, config.mesh_shape, devices)
        rules = as_layout_rules(layout_rules) if layout_rules is not None else None
        rules = rules if rules is not None else layout_rules_of(model)
        # A preset holds its weights: those no step writes need not be checkpointed.
        restorable = set()
        if self.base_model is not None:
            written = written_in_training(model, self.model_adapter, config.seq_len)
            restorable = set(range(len(model.non_trainable_variables))) - written
        self.key_groups = state_lib.key_groups(model, self.adapter, restorable)
        self.state_shardings = state_lib.state_shardings(
            self.mesh, model, self.adapter, rules, config.min_shard_size
        )
        self.batch_sharding = batch_sharding(self.mesh)
        self.steps = compile_steps(self._step_builder(), self.state_shardings, self.batch_sharding)

    def _step_builder(self) -> StepBuilder:
        """The pure steps for this model, optimizer and config."""
        accum = self.config.grad_accum_steps
        micro = jax.sharding.NamedSharding(
            self.mesh, jax.sharding.PartitionSpec(None, ("data", "fsdp"))
        )
        return StepBuilder(
            self.model,
            self.adapter,
            self.key_groups["params"],
            self.key_groups["non_trainable"],
            accum,
            micro_batch_sharding=micro if accum > 1 else None,
            skip_nonfinite=self.config.on_nonfinite == "skip",
            model_adapter=self.model_adapter,
            clipping=self.description.get("clipping"),
            frozen_keys=self.key_groups.get("frozen", ()),
        )

    def fresh_state(self) -> TrainState:
        """A fresh state from the model's current variables, placed on the mesh."""
        return state_lib.initial_state(
            self.model, self.state_shardings, self.steps.init_optimizer, self.config.seed,
            shared=self.key_groups.get("frozen", ()),
        )  # fmt: skip

    @functools.cached_property
    def _abstract(self) -> TrainState:
        return state_lib.abstract_state(self.fresh_state, self.state_shardings)

    def template(self) -> StateTemplate:
        """What a restore needs: the state's shapes, dtypes and shardings, keys, optimizer.

        Abstract: traced once, nothing is computed or placed.
        """
        frozen = self.key_groups.get("frozen", [])
        return StateTemplate(
            self._abstract,
            self.key_groups,
            self.adapter,
            self.steps.init_optimizer,
            self.base_model,
            lambda: state_lib.placed_variables(
                self.model, frozen, self.state_shardings.non_trainable
            ),
        )

    def eval_loss(self, state: TrainState, batches: Iterable[dict]) -> float:
        """Mean token loss of ``state`` over ``batches`` (placed batches): the sum of the
        masked token losses over the count of the tokens they weigh.

        A schedule-free optimizer trains at one point and is evaluated at its average (the
        eval step asks the optimizer adapter for the parameters to evaluate).
        """
        evaluate = functools.partial(
            self.steps.eval_step, state.params, state.opt_state, state.non_trainable
        )
        sums = [evaluate(batch) for batch in batches]
        return float(sum(s for s, _ in sums)) / max(float(sum(c for _, c in sums)), 1.0)

    def write_back(self, state: TrainState) -> None:
        """Give the trained values back to the Keras objects the user holds."""
        state_lib.write_back(state, self.model, self.key_groups, self.adapter)

    def held_variables(self) -> list[keras.Variable]:
        """The Keras objects' own variables: the model's and the optimizer's (if any)."""
        return [*self.model.variables, *self.adapter.variables]
