"""Writing one MLflow run from a background thread, so training never waits on tracking.

Everything a run logs (creating the run, params, tags, artifacts, metrics, the final status)
is queued in order and written by one thread. Consecutive metric points are sent together
with ``log_batch``. When the tracking server is slow or down, the thread keeps the queue,
warns once, and retries with backoff; points are delivered when the server returns. What
is still queued when the run must end is written to a spool file (JSON lines) that
``replay_spool`` sends later, so nothing is lost.

A refusal is not an outage (see ``faults``): a record MLflow refuses is reported once per
kind and dropped; a run it refuses (a store that cannot be opened, a deleted run, an
experiment name it will not take) is reported once, and the run's records go to the spool.
Even opening the store happens on the writer thread, so training never waits on it.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import threading
import time
from pathlib import Path
from typing import Any

import mlflow
from mlflow.tracking import MlflowClient

from kithara_ops.config.credentials import masked, take_credentials
from kithara_ops.errors import first_line
from kithara_ops.tracking.experiments import experiment_id
from kithara_ops.tracking.faults import (
    RunRefused,
    is_local_store,
    is_permanent,
    is_store_fault,
    refuses_run,
)
from kithara_ops.tracking.params import MAX_METRICS_PER_BATCH, MAX_PARAMS_PER_BATCH
from kithara_ops.tracking.records import RECORD_NAMES, write_record
from kithara_ops.tracking.spool import save_undelivered

log = logging.getLogger("kithara_ops.tracking")

RUN_UID_TAG = "kithara_ops.run_uid"
"""The tag holding a run's own identity (``RunInfo.run_uid``): a resume finds its run by it."""


@dataclasses.dataclass
class Delivery:
    """How a run's logging ended.

    Attributes:
      run_id: the MLflow run id (``None`` if the run could never be created).
      delivered_points: metric points written.
      pending_points: metric points not written when the run ended.
      spool: the file holding what was not written, if anything.
      dropped: records MLflow refused (reported when first refused, then left out).
      refused: why MLflow refused the whole run, if it did.
    """

    run_id: str | None
    delivered_points: int
    pending_points: int
    spool: Path | None
    dropped: int = 0
    refused: str | None = None


class RunWriter:
    """Creates (or reattaches to) one MLflow run and writes to it in the background.

    Args:
      tracking_uri: where to log; ``None`` lets MLflow resolve it (``MLFLOW_TRACKING_URI``,
        else its local sqlite default).
      experiment: experiment name; created with ``EXPERIMENT_TAGS`` if it does not exist.
      run_name: display name of a new run.
      run_id: an existing run to continue instead of creating one.
      parent_run_id: make a new run the child of this one (MLflow's nested runs).
      spool_dir: where undelivered operations are written at the end.
      run_uid: the run's own identity, set as the tag ``kithara_ops.run_uid``.
      find_existing: with ``run_uid`` and no ``run_id``, continue the experiment's run that
        carries that tag if there is one (a resumed run), else create it.
    """

    def __init__(
        self,
        tracking_uri: str | None,
        experiment: str,
        run_name: str | None = None,
        run_id: str | None = None,
        spool_dir: Path | None = None,
        parent_run_id: str | None = None,
        retry_max_wait: float = 10.0,
        flush_interval: float = 1.0,
        run_uid: str | None = None,
        find_existing: bool = False,
    ):
        # The client is made on the writer thread: opening a SQLite store creates or migrates
        # its tables, and a store that cannot be opened must not stop the run from starting.
        self.client: MlflowClient | None = None
        # $MLFLOW_TRACKING_URI may hold credentials too: they never reach a message or a file.
        self.tracking_uri = take_credentials(tracking_uri or mlflow.get_tracking_uri())
        self.experiment = experiment
        self.run_name = run_name
        self.run_id = run_id
        self.parent_run_id = parent_run_id
        self.run_uid = run_uid
        self.find_existing = find_existing and run_uid is not None
        self.spool_dir = Path(spool_dir) if spool_dir else Path.cwd() / "mlflow-spool"
        self.retry_max_wait = retry_max_wait
        self.flush_interval = flush_interval
        self.delivered_points = 0
        self.dropped = 0
        self.refused: str | None = None
        self.store_fault = False
        self.experiment_id: str | None = None
        self.on_run_ready: list = []
        self._queue: collections.deque = collections.deque()
        self._cond = threading.Condition()
        self._closing_deadline: float | None = None
        self._abandoned = False
        self._attached = run_id is None  # an existing run is checked before the first write
        self._logged_through: dict[str, int] = {}
        self._warned = False
        self._refused_kinds: set[str] = set()
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, name="mlflow-writer", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ caller side
    def log_params(self, params: dict[str, str]) -> None:
        """Queue params (sent ``MAX_PARAMS_PER_BATCH`` at a time, MLflow's limit)."""
        items = list(params.items())
        for i in range(0, len(items), MAX_PARAMS_PER_BATCH):
            self._put("params", dict(items[i : i + MAX_PARAMS_PER_BATCH]))

    def set_tags(self, tags: dict[str, str]) -> None:
        """Queue tags."""
        self._put("tags", dict(tags))

    def log_text(self, text: str, artifact_file: str) -> None:
        """Queue a text artifact."""
        self._put("text", {"text": text, "artifact_file": artifact_file})

    def log_table(self, columns: dict[str, list], artifact_file: str, step: int) -> None:
        """Queue rows of ``step`` appended to a table artifact (``MlflowClient.log_table``)."""
        self._put("table", {"columns": columns, "artifact_file": artifact_file, "step": step})

    def log_artifacts(self, local_dir: str, artifact_path: str) -> None:
        """Queue a directory of artifacts (read when sent: keep it until ``finish``)."""
        self._put("artifacts", {"local_dir": str(local_dir), "artifact_path": artifact_path})

    def log_checkpoint(
        self, step: int, path: str, metrics: dict[str, tuple[float, int, int]]
    ) -> None:
        """Queue a complete checkpoint, recorded as a logged model (``logged_models``) with
        the run's points ``{key: (value, timestamp_ms, step)}`` it holds."""
        points = {k: [float(v), int(ts), int(at)] for k, (v, ts, at) in metrics.items()}
        self._put("checkpoint", {"step": int(step), "path": str(path), "metrics": points})

    def log_dataset(self, summary: dict) -> None:
        """Queue the training data's summary, recorded as the run's input."""
        self._put("dataset", dict(summary))

    def log_metrics(self, step: int, metrics: dict[str, float], timestamp_ms: int) -> None:
        """Queue one step's metric points; returns at once."""
        points = [(k, float(v), timestamp_ms, int(step)) for k, v in metrics.items()]
        self._put("metrics", points)

    def finish(
        self, status: str, timeout: float = 60.0, cancel: threading.Event | None = None
    ) -> Delivery:
        """Queue the end of the run, wait for delivery, and spool what is left.

        Args:
          status: the run's final MLflow status (``FINISHED``, ``FAILED``, ``KILLED``).
          timeout: the most seconds to wait, however slow or silent the server is.
          cancel: stop waiting as soon as this is set (a signal during the wait).
        """
        self._put("end", {"status": status})
        deadline = time.monotonic() + timeout
        with self._cond:
            self._closing_deadline = deadline
            self._cond.notify_all()
        # Short waits rather than one join: the thread may be stuck in a request that never
        # returns, and ``cancel`` must be seen within a moment of being set.
        while not self._done.is_set() and (left := deadline - time.monotonic()) > 0:
            if cancel is not None and cancel.is_set():
                break
            self._done.wait(min(left, 0.05))
        with self._cond:
            # A request may still be in flight in a stuck thread; it may yet arrive, so the
            # spool can repeat its points, but it can never lose them.
            self._abandoned = True
            self._closing_deadline = min(deadline, time.monotonic())
            self._cond.notify_all()
            pending = list(self._queue)
            self._queue.clear()
        points = sum(len(p) for kind, p in pending if kind == "metrics")
        spool = self._spool(pending) if pending else None
        return Delivery(
            self.run_id, self.delivered_points, points, spool, self.dropped, self.refused
        )

    def _put(self, kind: str, payload: Any) -> None:
        with self._cond:
            self._queue.append((kind, payload))
            self._cond.notify_all()

    # ------------------------------------------------------------------ writer thread
    def _run(self) -> None:
        try:
            self._deliver()
        finally:
            self._done.set()

    def _deliver(self) -> None:
        backoff = 0.25
        while True:
            with self._cond:
                while not self._queue and self._closing_deadline is None:
                    self._cond.wait()
                self._gather_metrics()
                if not self._queue or self._past_deadline():
                    return
                kind, payload = self._queue[0]
                taken = 1
                if kind == "metrics":
                    payload, taken = self._peek_metrics()
            opening = True
            try:
                self._open_run()
                opening = False
                self._write(kind, payload)
            except Exception as err:
                if (opening and self._refuses_store(err)) or refuses_run(err):
                    # A local store that could not even be opened is as broken as a full one.
                    unopened = self.client is None and is_local_store(self.tracking_uri)
                    self._refuse_run(err, store_fault=unopened or is_store_fault(err))
                    return  # the queue stays; finish() spools it
                if is_permanent(err):  # this record, and only it, will never be taken
                    self._refuse_record(kind, err)
                    with self._cond:
                        if self._abandoned:
                            return
                        for _ in range(taken):
                            self._queue.popleft()
                    if kind == "end":
                        return
                    continue
                # The server is down or slow: keep the record and retry.
                self._warn_once(err)
                with self._cond:
                    if self._past_deadline():
                        return
                    self._cond.wait(backoff)
                backoff = min(backoff * 2, self.retry_max_wait)
                continue
            backoff = 0.25
            with self._cond:
                if self._abandoned:
                    return  # finish() has spooled the queue; it is no longer ours
                for _ in range(taken):  # written: only now may they leave the queue
                    self._queue.popleft()
            if kind == "metrics":
                self.delivered_points += len(payload)
            if self._warned:
                log.warning(
                    "MLflow at %s is reachable again; logging resumed.", masked(self.tracking_uri)
                )
                self._warned = False
            if kind == "end":
                return

    def _gather_metrics(self) -> None:
        """Let metric points gather for up to ``flush_interval`` s, so one request carries many
        steps (a request per step costs a busy server, and the machine, more than the data)."""
        if not self._queue or self._queue[0][0] != "metrics":
            return
        deadline = time.monotonic() + self.flush_interval
        while self._closing_deadline is None and (remaining := deadline - time.monotonic()) > 0:
            if sum(len(p) for k, p in self._queue if k == "metrics") >= MAX_METRICS_PER_BATCH:
                return
            self._cond.wait(remaining)

    def _past_deadline(self) -> bool:
        return self._closing_deadline is not None and time.monotonic() > self._closing_deadline

    def _peek_metrics(self) -> tuple[list, int]:
        """The leading metric ops' points, up to one ``log_batch`` worth, and their count."""
        points, taken = [], 0
        for kind, op_points in self._queue:
            if kind != "metrics" or (
                points and len(points) + len(op_points) > MAX_METRICS_PER_BATCH
            ):
                break
            points.extend(op_points)
            taken += 1
        return points, taken

    def _open_run(self) -> None:
        """Open the store and create or reattach to the run, whichever is not done yet."""
        if self.client is None:
            self.client = MlflowClient(self.tracking_uri)
        if self.run_id is None:
            self._start_run()
        elif not self._attached:
            self._attach()

    def _refuses_store(self, err: Exception) -> bool:
        """Whether an error while opening the run means it can never be opened."""
        # A local store that cannot even be opened (a path that cannot be a directory, a
        # file that is not a database) stays so; a remote store's client opens nothing.
        # A locked database (another process migrating it) is the one passing failure here.
        opening_local = self.client is None and is_local_store(self.tracking_uri)
        return is_permanent(err) or (opening_local and "locked" not in str(err))

    def _start_run(self) -> None:
        experiment = experiment_id(self.client, self.experiment, create=True)
        if self.find_existing:
            found = self.client.search_runs(
                [experiment], f"tags.`{RUN_UID_TAG}` = '{self.run_uid}'", max_results=1
            )
            if found:
                self.run_id = found[0].info.run_id
                self._attach()
                return
        tags = {"mlflow.parentRunId": self.parent_run_id} if self.parent_run_id else {}
        if self.run_uid:
            tags[RUN_UID_TAG] = self.run_uid
        run = self.client.create_run(experiment, run_name=self.run_name, tags=tags or None)
        self.run_id, self.experiment_id = run.info.run_id, run.info.experiment_id
        for callback in self.on_run_ready:
            callback(self.run_id)

    def _attach(self) -> None:
        """Continue an existing run: RUNNING again, and note the steps each metric holds."""
        run = self.client.get_run(self.run_id)
        if run.info.lifecycle_stage == "deleted":
            raise RunRefused(f"the run {self.run_id} was deleted")
        self.experiment_id = run.info.experiment_id
        for key in run.data.metrics:
            if not key.startswith("system/"):
                steps = [m.step for m in self.client.get_metric_history(self.run_id, key)]
                self._logged_through[key] = max(steps, default=-1)
        if run.info.status != "RUNNING":
            self.client.update_run(self.run_id, status="RUNNING")
        self._attached = True
        for callback in self.on_run_ready:
            callback(self.run_id)

    def _write(self, kind: str, payload: Any) -> None:
        write_record(
            self.client, self.experiment_id, self.run_id, kind, payload, self._logged_through
        )

    def _warn_once(self, err: Exception) -> None:
        if not self._warned:
            log.warning(
                "MLflow at %s is not responding (%s); training goes on and metrics are kept "
                "until it comes back.",
                masked(self.tracking_uri),
                first_line(err),
            )
            self._warned = True

    def _refuse_run(self, err: Exception, store_fault: bool) -> None:
        self.refused, self.store_fault = first_line(err), store_fault
        if store_fault:
            return  # the run stops on it (``RunTracker.failure``) and says so in its error
        log.warning(
            "MLflow at %s cannot take this run (%s); training goes on untracked, and what it "
            "logs is saved to a spool file at the end.",
            masked(self.tracking_uri),
            self.refused,
        )

    def _refuse_record(self, kind: str, err: Exception) -> None:
        self.dropped += 1
        if kind not in self._refused_kinds:
            self._refused_kinds.add(kind)
            log.warning(
                "MLflow at %s refused the run's %s (%s); they are left out, the rest is logged.",
                masked(self.tracking_uri),
                RECORD_NAMES.get(kind, kind),
                first_line(err),
            )

    def _spool(self, pending: list) -> Path | None:
        header = {
            "tracking_uri": self.tracking_uri,
            "experiment": self.experiment,
            "run_name": self.run_name,
            "run_id": self.run_id,
        }
        # Not the URI again when the run was refused: that line already named the store.
        where = "MLflow" if self.refused else f"MLflow at {masked(self.tracking_uri)}"
        if self.store_fault:  # no line said so yet when the run ended before it could stop
            where = f"MLflow at {masked(self.tracking_uri)} ({self.refused})"
        return save_undelivered(self.spool_dir, header, pending, where)
