"""Finding MLflow experiments by name, and creating the ones a run logs into.

Every part of kithara-ops that turns an experiment name into an id goes through here, so
that an experiment is created the same way (with ``EXPERIMENT_TAGS``) wherever a run starts,
and a deleted experiment is told apart from a missing one wherever runs are read.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    from mlflow.tracking import MlflowClient

EXPERIMENT_TAGS = {"mlflow.experimentKind": "custom_model_development"}
"""Tags of experiments kithara-ops creates: the MLflow UI then treats runs as model training."""
DEFAULT_EXPERIMENT = "kithara-ops"
"""The experiment a run logs into, and ``kithara-ops ui`` opens, when none is named."""

State = Literal["active", "deleted", "missing"]
"""What became of an experiment: MLflow's lifecycle stage, or ``missing`` if it never was."""


def experiment_state(client: MlflowClient, name: str) -> tuple[str | None, State]:
    """The id and state of the experiment called ``name``.

    Returns:
      ``(id, "active")`` for a live experiment, ``(id, "deleted")`` for one in MLflow's
      trash (its name is still taken), ``(None, "missing")`` when there is none.
    """
    found = client.get_experiment_by_name(name)
    if found is None:
        return None, "missing"
    state: State = "active" if found.lifecycle_stage == "active" else "deleted"
    return str(found.experiment_id), state


def experiment_id(client: MlflowClient, name: str, create: bool = False) -> str | None:
    """The id of the experiment called ``name``, live or deleted.

    Args:
      client: the client of the tracking store to look in.
      name: the experiment's name.
      create: create a missing experiment, tagged with ``EXPERIMENT_TAGS``.

    Returns:
      The id, or ``None`` when there is no such experiment and ``create`` is off. A deleted
      experiment's id is returned too: its name is still taken, and MLflow refuses new runs
      in it with an error that says why.
    """
    found, state = experiment_state(client, name)
    if state != "missing" or not create:
        return found
    from mlflow.exceptions import MlflowException

    try:
        return client.create_experiment(name, tags=EXPERIMENT_TAGS)
    except MlflowException:
        # Processes started together (a sweep's, a launch's) race to create it: one wins,
        # and the others use the one it created.
        found, state = experiment_state(client, name)
        if state == "missing":
            raise
        return found
