"""Writing one MLflow run from a background thread, so training never waits on tracking.

Everything a run logs (creating the run, params, tags, artifacts, metrics, the final status)
is queued in order and written by one thread. Consecutive metric points are sent together
with ``log_batch``. When the tracking server is slow or down, the thread keeps the queue,
warns once, and retries with backoff; points are delivered when the server returns. What
is still queued when the run must end is written to a spool file (JSON lines) that
``replay_spool`` sends later, so nothing is lost.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import logging
import threading
import time
from pathlib import Path
from typing import Any

from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient

from kithara_ops.errors import first_line
from kithara_ops.tracking.experiments import experiment_id
from kithara_ops.tracking.params import MAX_METRICS_PER_BATCH, MAX_PARAMS_PER_BATCH

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
    """

    run_id: str | None
    delivered_points: int
    pending_points: int
    spool: Path | None


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
        self.client = MlflowClient(tracking_uri)
        self.tracking_uri = self.client.tracking_uri
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
        self.on_run_ready: list = []
        self._queue: collections.deque = collections.deque()
        self._cond = threading.Condition()
        self._closing_deadline: float | None = None
        self._abandoned = False
        self._attached = run_id is None  # an existing run is checked before the first write
        self._logged_through: dict[str, int] = {}
        self._warned = False
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

    def log_artifacts(self, local_dir: str, artifact_path: str) -> None:
        """Queue a directory of artifacts (read when sent: keep it until ``finish``)."""
        self._put("artifacts", {"local_dir": str(local_dir), "artifact_path": artifact_path})

    def log_metrics(self, step: int, metrics: dict[str, float], timestamp_ms: int) -> None:
        """Queue one step's metric points; returns at once."""
        points = [(k, float(v), timestamp_ms, int(step)) for k, v in metrics.items()]
        self._put("metrics", points)

    def finish(self, status: str, timeout: float = 60.0) -> Delivery:
        """Queue the end of the run, wait up to ``timeout`` s for delivery, spool the rest."""
        self._put("end", {"status": status})
        with self._cond:
            self._closing_deadline = time.monotonic() + timeout
            self._cond.notify_all()
        self._thread.join(timeout + 5.0)
        with self._cond:
            # A request may still be in flight in a stuck thread; it may yet arrive, so the
            # spool can repeat its points, but it can never lose them.
            self._abandoned = True
            pending = list(self._queue)
            self._queue.clear()
        points = sum(len(p) for kind, p in pending if kind == "metrics")
        spool = self._spool(pending) if pending else None
        if spool is not None:
            log.warning(
                "MLflow at %s could not be reached: %d metric points and %d other records were "
                "not delivered and are saved in %s (send them later with "
                "kithara_ops.tracking.replay_spool).",
                self.tracking_uri,
                points,
                len(pending) - sum(k == "metrics" for k, _ in pending),
                spool,
            )
        return Delivery(self.run_id, self.delivered_points, points, spool)

    def _put(self, kind: str, payload: Any) -> None:
        with self._cond:
            self._queue.append((kind, payload))
            self._cond.notify_all()

    # ------------------------------------------------------------------ writer thread
    def _run(self) -> None:
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
            try:
                if self.run_id is None:
                    self._start_run()
                elif not self._attached:
                    self._attach()
                self._write(kind, payload)
            except Exception as err:  # the server is down, slow or refusing: keep and retry
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
                log.warning("MLflow at %s is reachable again; logging resumed.", self.tracking_uri)
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

    def _start_run(self) -> None:
        experiment = experiment_id(self.client, self.experiment, create=True)
        if self.find_existing:
            found = self.client.search_runs(
                [experiment], f"tags.`{RUN_UID_TAG}` = '{self.run_uid}'", max_results=1
            )
            if found:
                self.run_id = found[0].info.run_id
                self._attach()
                for callback in self.on_run_ready:
                    callback(self.run_id)
                return
        tags = {"mlflow.parentRunId": self.parent_run_id} if self.parent_run_id else {}
        if self.run_uid:
            tags[RUN_UID_TAG] = self.run_uid
        run = self.client.create_run(experiment, run_name=self.run_name, tags=tags or None)
        self.run_id = run.info.run_id
        for callback in self.on_run_ready:
            callback(self.run_id)

    def _attach(self) -> None:
        """Continue an existing run: RUNNING again, and note the steps each metric holds."""
        run = self.client.get_run(self.run_id)
        for key in run.data.metrics:
            if not key.startswith("system/"):
                steps = [m.step for m in self.client.get_metric_history(self.run_id, key)]
                self._logged_through[key] = max(steps, default=-1)
        if run.info.status != "RUNNING":
            self.client.update_run(self.run_id, status="RUNNING")
        self._attached = True

    def _write(self, kind: str, payload: Any) -> None:
        client, run_id = self.client, self.run_id
        if kind == "metrics":
            # Steps the run already holds (logged before a crash, then trained again after a
            # resume) keep their first values: a history has one point per step.
            metrics = [
                Metric(k, v, ts, step)
                for k, v, ts, step in payload
                if step > self._logged_through.get(k, -1)
            ]
            if metrics:
                client.log_batch(run_id, metrics=metrics, synchronous=True)
        elif kind == "params":
            params = [Param(k, v) for k, v in payload.items()]
            client.log_batch(run_id, params=params, synchronous=True)
        elif kind == "tags":
            client.log_batch(
                run_id, tags=[RunTag(k, v) for k, v in payload.items()], synchronous=True
            )
        elif kind == "text":
            client.log_text(run_id, payload["text"], payload["artifact_file"])
        elif kind == "artifacts":
            client.log_artifacts(run_id, payload["local_dir"], payload["artifact_path"])
        elif kind == "end":
            client.set_terminated(run_id, payload["status"])

    def _warn_once(self, err: Exception) -> None:
        if not self._warned:
            log.warning(
                "MLflow at %s is not responding (%s); training goes on and metrics are kept "
                "until it comes back.",
                self.tracking_uri,
                first_line(err),
            )
            self._warned = True

    def _spool(self, pending: list) -> Path:
        self.spool_dir.mkdir(parents=True, exist_ok=True)
        path = self.spool_dir / f"{self.run_id or 'unstarted'}-{int(time.time())}.jsonl"
        with path.open("w") as f:
            header = {
                "tracking_uri": self.tracking_uri,
                "experiment": self.experiment,
                "run_name": self.run_name,
                "run_id": self.run_id,
            }
            f.write(json.dumps({"kind": "run", "payload": header}) + "\n")
            for kind, payload in pending:
                f.write(json.dumps({"kind": kind, "payload": payload}) + "\n")
        return path


def replay_spool(
    path: str | Path, tracking_uri: str | None = None, timeout: float = 120.0
) -> Delivery:
    """Send a spool file's records to MLflow, in order, into the run they belong to.

    Args:
      path: a spool file written when a run ended with MLflow unreachable.
      tracking_uri: override the URI recorded in the file.
    """
    lines = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    header = lines[0]["payload"]
    writer = RunWriter(
        tracking_uri or header["tracking_uri"],
        header["experiment"],
        run_name=header["run_name"],
        run_id=header["run_id"],
        spool_dir=Path(path).parent,
    )
    status = "FINISHED"
    for record in lines[1:]:
        if record["kind"] == "end":
            status = record["payload"]["status"]
            continue
        writer._put(record["kind"], record["payload"])
    return writer.finish(status, timeout)
