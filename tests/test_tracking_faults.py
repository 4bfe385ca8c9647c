"""MLflow that hangs, refuses or cannot be opened never loses a run nor holds it up for long.

The servers here are fakes on 127.0.0.1 that accept a request and never answer it (the worst
kind of outage: nothing fails, everything waits), and real SQLite stores that refuse.
"""

import http.server
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from disks import fill, tmpfs
from mlflow import MlflowClient

from kithara_ops.tracking import RunWriter

FAST = ["--model", "tiny", "--data", "synthetic", "--seq-len", "32", "--batch-size", "8"]
FLUSH_TIMEOUT = 6.0
MARGIN = 3.0  # from the checkpoint's folder appearing to the wait's start, on a busy machine


class HungServer(http.server.ThreadingHTTPServer):
    """Accepts every request and holds it without answering until ``close()``.

    With ``create_runs``, it answers just enough of MLflow's API to create a run (so the
    system-metrics monitor starts) and hangs on everything else.
    """

    daemon_threads = True

    def __init__(self, create_runs: bool = False):
        super().__init__(("127.0.0.1", 0), _HangingHandler)
        self.create_runs = create_runs
        self.released = threading.Event()
        self.requests: list[str] = []
        self.uri = f"http://127.0.0.1:{self.server_address[1]}"
        self._thread = threading.Thread(target=self.serve_forever, daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self.released.set()
        self.shutdown()
        self.server_close()
        self._thread.join(10)


class _HangingHandler(http.server.BaseHTTPRequestHandler):
    server: HungServer

    def log_message(self, *args):  # the test output is not the place for a request log
        pass

    def _handle(self):
        self.server.requests.append(self.path)
        if self.server.create_runs and "experiments/get-by-name" in self.path:
            return self._answer({"experiment": {"experiment_id": "1", "name": "faults",
                                                "lifecycle_stage": "active"}})  # fmt: skip
        if self.server.create_runs and "runs/create" in self.path:
            info = {"run_id": "f" * 32, "run_uuid": "f" * 32, "experiment_id": "1",
                    "status": "RUNNING", "lifecycle_stage": "active", "start_time": 0}  # fmt: skip
            return self._answer({"run": {"info": info, "data": {}}})
        self.server.released.wait(300)

    def _answer(self, body):
        data = json.dumps(body).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    do_GET = do_POST = _handle


def cli_env(**extra):
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
    env["KITHARA_OPS_MLFLOW_FLUSH_TIMEOUT"] = str(FLUSH_TIMEOUT)
    env["MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL"] = "1"
    env.update(extra)
    return env


def train(cwd, *args, **env):
    """A ``kithara-ops train`` process; its stderr lines are collected as they come."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "kithara_ops.cli", "train", *FAST, "--quiet", *args],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=cwd, env=cli_env(**env),
    )  # fmt: skip
    proc.lines, proc.times = [], []

    def read():
        for line in proc.stderr:
            proc.times.append(time.monotonic())
            proc.lines.append(line)

    proc.reader = threading.Thread(target=read, daemon=True)
    proc.reader.start()
    return proc


def when(proc, text):
    """When the first stderr line holding ``text`` came (``time.monotonic()``)."""
    return next(t for t, line in zip(proc.times, proc.lines, strict=False) if text in line)


def finish(proc, timeout=300):
    try:
        code = proc.wait(timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    proc.reader.join(10)
    return code, "".join(proc.lines)


def wait_for(predicate, timeout=240.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return False


def saved(ckpt: Path, step: int) -> bool:
    return (ckpt / str(step)).is_dir()


def spools(cwd: Path):
    folder = cwd / "mlflow-spool"
    return sorted(folder.glob("*.jsonl")) if folder.exists() else []


@pytest.mark.parametrize("create_runs", [False, True], ids=["hangs-at-once", "hangs-after-run"])
def test_a_hung_server_costs_at_most_the_flush_timeout_at_the_end(tmp_path, create_runs):
    ckpt = tmp_path / "ckpt"
    with HungServer(create_runs) as server:
        proc = train(tmp_path, "--steps", "3", "--checkpoint-dir", str(ckpt),
                     "--tracking-uri", server.uri, "--system-metrics")  # fmt: skip
        try:
            assert wait_for(lambda: saved(ckpt, 3) or proc.poll() is not None)
            saved_at = time.monotonic()
            code, stderr = finish(proc, 120)
        finally:
            finish(proc, 1)
    assert code == 0, stderr
    assert saved(ckpt, 3)
    # The wait ends with the line naming the spool; the process then exits as any run does.
    waited = when(proc, "are saved in") - saved_at
    assert waited < FLUSH_TIMEOUT + MARGIN, (waited, stderr)
    assert len(spools(tmp_path)) == 1, stderr
    assert "Traceback" not in stderr
    if create_runs:  # the run was created, so the monitor ran (and hung) too
        assert any("runs/create" in path for path in server.requests)


@pytest.mark.parametrize(
    ("signals", "code"),
    [((signal.SIGTERM,), 143), ((signal.SIGINT,), 130), ((signal.SIGINT, signal.SIGINT), 130)],
    ids=["sigterm", "ctrl-c", "ctrl-c-twice"],
)
def test_a_signal_during_the_flush_ends_the_wait_at_once(tmp_path, signals, code):
    ckpt = tmp_path / "ckpt"
    flush_timeout = 120.0  # the end would wait this long without the signal
    with HungServer() as server:
        proc = train(tmp_path, "--steps", "3", "--checkpoint-dir", str(ckpt),
                     "--tracking-uri", server.uri, "--no-system-metrics",
                     KITHARA_OPS_MLFLOW_FLUSH_TIMEOUT=str(flush_timeout))  # fmt: skip
        try:
            # The checkpoint is written first; the notice comes once the flush has waited.
            assert wait_for(lambda: any("Waiting up to" in line for line in proc.lines))
            assert saved(ckpt, 3)
            sent = time.monotonic()
            for signum in signals:
                proc.send_signal(signum)
                time.sleep(0.05)
            exit_code, stderr = finish(proc, flush_timeout)
            exited = time.monotonic() - sent
        finally:
            finish(proc, 1)
    assert exit_code == code, stderr
    assert exited < 30.0, (exited, stderr)  # the interpreter's own exit takes seconds here
    assert saved(ckpt, 3)
    if len(signals) == 1:  # a second Ctrl-C may cut the spooling short; never the checkpoint
        assert when(proc, "are saved in") - sent < 2.0, stderr
        assert len(spools(tmp_path)) == 1, stderr


def test_the_checkpoint_is_written_before_mlflow_is_flushed(tmp_path, make_model):
    import optax

    from kithara_ops import Callback, Trainer, data
    from kithara_ops.interrupt import TrainingStopped
    from kithara_ops.tracking.tracker import MlflowTracker

    ckpt = tmp_path / "ckpt"
    order = []

    class Watch(MlflowTracker):
        def on_train_end(self, status, result):
            steps = sorted(int(p.name) for p in ckpt.iterdir() if p.name.isdigit())
            order.append(("tracker", steps[-1] if steps else None))
            super().on_train_end(status, result)

    class Stop(Callback):
        def on_step(self, record):
            if record.step == 3:
                os.kill(os.getpid(), signal.SIGTERM)  # the run stops after the next step

    trainer = Trainer(
        make_model(), optax.adam(1e-3), data.load("synthetic", seq_len=32, batch_size=8),
        steps=10, checkpoint_dir=str(ckpt), callbacks=[Stop()], system_metrics=False,
        tracking_uri=f"sqlite:///{tmp_path}/runs.db",
    )  # fmt: skip
    tracker = trainer.sinks.tracker
    tracker.__class__ = Watch
    with pytest.raises(TrainingStopped) as stopped:
        trainer.train()
    assert order == [("tracker", stopped.value.step)]
    assert trainer.sinks.callbacks.index(trainer.sinks.checkpoints) < (
        trainer.sinks.callbacks.index(tracker)
    )


def test_an_experiment_name_mlflow_refuses_is_one_warning_and_training_goes_on(tmp_path):
    # A long flush timeout: opening a fresh SQLite store can take seconds on a busy machine,
    # and the refusal ends the wait by itself.
    proc = train(tmp_path, "--steps", "3", "--tracking-uri", f"sqlite:///{tmp_path}/runs.db",
                 "--experiment", "x" * 600, "--no-system-metrics",
                 KITHARA_OPS_MLFLOW_FLUSH_TIMEOUT="120")  # fmt: skip
    code, stderr = finish(proc)
    assert code == 0, stderr
    refusals = [line for line in stderr.splitlines() if "cannot take this run" in line]
    assert len(refusals) == 1, stderr
    assert "exceeds the maximum length" in refusals[0]
    assert "not responding" not in stderr and "Traceback" not in stderr
    assert len(spools(tmp_path)) == 1


def stopped_by_the_store(proc, ckpt, cwd):
    """The one error line of a run a store stopped, its stderr and the step it stopped after;
    asserts exit 1, no traceback, only that step checkpointed and the rest spooled."""
    code, stderr = finish(proc)
    assert code == 1, stderr
    errors = [line for line in stderr.splitlines() if line.startswith("Error: ")]
    assert len(errors) == 1 and "Traceback" not in stderr, stderr
    stopped = int(re.search(r"stopped after step (\d+)", errors[0]).group(1))
    assert sorted(int(p.name) for p in ckpt.iterdir() if p.name.isdigit()) == [stopped]
    assert len(spools(cwd)) == 1
    return errors[0], stderr, stopped


def test_a_store_that_cannot_be_opened_stops_the_run_in_one_line(tmp_path):
    (tmp_path / "not-a-dir").write_text("")
    db = tmp_path / "not-a-dir" / "runs.db"
    ckpt = tmp_path / "ckpt"
    proc = train(tmp_path, "--steps", "5000", "--tracking-uri", f"sqlite:///{db}",
                 "--checkpoint-dir", str(ckpt), "--no-system-metrics",
                 KITHARA_OPS_MLFLOW_FLUSH_TIMEOUT="120")  # fmt: skip
    error, stderr, stopped = stopped_by_the_store(proc, ckpt, tmp_path)
    assert str(db) in error and "File exists" in error, error
    assert stopped < 5000 and f"step {stopped} is checkpointed in {str(ckpt)!r}" in error
    assert "training goes on" not in stderr


@pytest.mark.slow
def test_a_read_only_store_stops_the_run_in_one_line(tmp_path):
    with tmpfs(tmp_path / "store", "size=64m") as store:
        # The tables are made in a process of its own, so no open file keeps the mount busy.
        make = f"from mlflow import MlflowClient; MlflowClient('sqlite:///{store}/runs.db')" \
               ".search_experiments()"  # fmt: skip
        subprocess.run([sys.executable, "-c", make], check=True, capture_output=True)
        remounted = subprocess.run(["mount", "-o", "remount,ro", str(store)], capture_output=True)
        if remounted.returncode:
            pytest.skip("cannot remount the tmpfs read-only here")
        ckpt = tmp_path / "ckpt"
        proc = train(tmp_path, "--steps", "5000", "--tracking-uri", f"sqlite:///{store}/runs.db",
                     "--checkpoint-dir", str(ckpt), "--no-system-metrics",
                     KITHARA_OPS_MLFLOW_FLUSH_TIMEOUT="120")  # fmt: skip
        error, _, _ = stopped_by_the_store(proc, ckpt, tmp_path)
    assert f"sqlite:///{store}/runs.db" in error and "readonly database" in error, error


def test_a_store_that_fills_up_stops_the_run_after_a_step_that_is_saved(
    tmp_path, make_model, monkeypatch
):
    import optax

    from kithara_ops import Callback, Trainer, data
    from kithara_ops.errors import StoreFailed

    class FillTheDisk(Callback):
        def on_step(self, record):
            if record.step == 2:
                fill(store)

    monkeypatch.chdir(tmp_path)  # where what MLflow did not take is spooled
    with tmpfs(tmp_path / "store", "size=64m") as store:
        ckpt = tmp_path / "ckpt"
        trainer = Trainer(
            make_model(), optax.adam(1e-3), data.load("synthetic", seq_len=32, batch_size=8),
            steps=5000, log_every=1, checkpoint_dir=str(ckpt), callbacks=[FillTheDisk()],
            system_metrics=False, tracking_uri=f"sqlite:///{store}/runs.db",
        )  # fmt: skip
        with pytest.raises(StoreFailed) as failed:
            trainer.train()
    message = str(failed.value)
    assert "\n" not in message and "database or disk is full" in message, message
    assert f"sqlite:///{store}/runs.db" in message
    stopped = int(re.search(r"stopped after step (\d+)", message).group(1))
    assert 2 < stopped < 5000
    # The step it stopped after is the one saved; what MLflow did not take is spooled.
    assert len(spools(tmp_path)) == 1
    assert sorted(int(p.name) for p in ckpt.iterdir() if p.name.isdigit()) == [stopped]
    assert int(trainer.sinks.checkpoints.read_record(stopped).step) == stopped


def test_a_deleted_run_is_one_warning_not_an_outage(tmp_path, caplog):
    uri = f"sqlite:///{tmp_path}/runs.db"
    client = MlflowClient(uri)
    run_id = client.create_run(client.create_experiment("deleted")).info.run_id
    client.delete_run(run_id)
    writer = RunWriter(uri, "deleted", run_id=run_id, spool_dir=tmp_path / "spool")
    writer.log_metrics(1, {"loss": 1.0}, 0)
    writer.set_tags({"a": "b"})
    delivery = writer.finish("FINISHED", 30.0)
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    refusals = [m for m in warnings if "cannot take this run" in m]
    assert len(refusals) == 1 and "deleted" in refusals[0], warnings
    assert not any("not responding" in m for m in warnings)
    assert delivery.refused and delivery.pending_points == 1 and delivery.spool.is_file()


def test_a_refused_record_is_reported_once_and_the_rest_is_logged(tmp_path, caplog):
    uri = f"sqlite:///{tmp_path}/runs.db"
    client = MlflowClient(uri)
    run_id = client.create_run(client.create_experiment("params")).info.run_id
    client.log_param(run_id, "lr", "0.1")
    writer = RunWriter(uri, "params", run_id=run_id, spool_dir=tmp_path / "spool")
    writer.log_params({"lr": "0.2"})  # MLflow never lets a param change
    writer.log_params({"lr": "0.3"})
    writer.log_metrics(1, {"loss": 1.0}, 0)
    started = time.monotonic()
    delivery = writer.finish("FINISHED", 30.0)
    assert time.monotonic() - started < 10
    refusals = [r.getMessage() for r in caplog.records if "refused" in r.getMessage()]
    assert len(refusals) == 1 and "params" in refusals[0], refusals
    assert delivery.dropped == 2 and delivery.spool is None and delivery.delivered_points == 1
    run = client.get_run(run_id)
    assert run.data.params["lr"] == "0.1" and run.info.status == "FINISHED"


def test_reattaching_to_a_hung_server_never_blocks_the_caller(tmp_path):
    with HungServer() as server:
        started = time.monotonic()
        writer = RunWriter(server.uri, "x", run_id="a" * 32, spool_dir=tmp_path, run_uid="u",
                           find_existing=True)  # fmt: skip
        writer.log_metrics(1, {"loss": 1.0}, 0)
        assert time.monotonic() - started < 0.5
        delivery = writer.finish("FINISHED", 1.0)
        assert time.monotonic() - started < 3.0
    assert delivery.pending_points == 1 and delivery.spool.is_file()


def test_a_reattached_run_is_announced_from_the_writer_thread(tmp_path):
    # The system-metrics monitor of a resumed run starts from this call, not on the caller's
    # thread: it reads the run first, which must never hold up training.
    uri = f"sqlite:///{tmp_path}/runs.db"
    client = MlflowClient(uri)
    run_id = client.create_run(client.create_experiment("resumed")).info.run_id
    client.set_terminated(run_id, "KILLED")
    ready = []
    writer = RunWriter(uri, "resumed", run_id=run_id, spool_dir=tmp_path / "spool")
    writer.on_run_ready.append(lambda rid: ready.append((rid, threading.current_thread().name)))
    writer.log_metrics(1, {"loss": 1.0}, 0)
    delivery = writer.finish("FINISHED", 60.0)
    assert ready == [(run_id, "mlflow-writer")]
    assert delivery.delivered_points == 1 and client.get_run(run_id).info.status == "FINISHED"
