"""Tuning before comparing: grids, Optuna searches with pruning, confirmation over seeds,
a study shared by processes, and the learning-rate range test.

One grid (2 optimizers x 3 learning rates, then each best over 2 seeds) is trained once for
the module; ``lr-find`` is checked against it.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from mlflow import MlflowClient
from typer.testing import CliRunner

from kithara_ops.cli import app
from kithara_ops.errors import ConfigError
from kithara_ops.optim.search_space import Distribution, fill, parse_grid, parse_space
from kithara_ops.search import STAGE_TAG

runner = CliRunner()
TEMPLATES = ["optax.adamw($lr)", "keras.optimizers.Adam($lr)"]
GROUPS = ["optax:adamw", "keras:adam"]
GRID = [1e-4, 3e-3, 1e-1]
STEPS = 6
FAST = ["--model", "tiny", "--data", "synthetic", "--eval-data", "synthetic", "--seq-len",
        "16", "--batch-size", "4", "--steps", str(STEPS), "--eval-every", "2", "--eval-steps",
        "1", "--log-every", "2", "--no-system-metrics"]  # fmt: skip


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def children(client, parent_id):
    experiment = client.get_run(parent_id).info.experiment_id
    runs = client.search_runs([experiment], f"tags.mlflow.parentRunId = '{parent_id}'")
    return runs


def last(client, run_id, key):
    history = client.get_metric_history(run_id, key)
    point = max(history, key=lambda m: m.step)
    return point.step, point.value


# ------------------------------------------------------------------------- spaces, parsed
def test_spaces_and_grids_parse_to_literal_values():
    assert parse_space("lr=loguniform(1e-5,1e-2)") == ("lr", Distribution("loguniform", 1e-5, 1e-2))
    assert parse_space(" b2 = choice(0.95, 0.999) ") == (
        "b2",
        Distribution("choice", values=(0.95, 0.999)),
    )
    assert parse_space("wd=uniform(-0.1,0.1)")[1].low == -0.1
    assert parse_space("k=int(1,8)")[1] == Distribution("int", 1, 8)
    assert parse_grid("lr=1e-4,3e-4") == ("lr", (1e-4, 3e-4))
    assert parse_grid("nesterov=True,False") == ("nesterov", (True, False))
    spec = fill("optax.sgd($lr, momentum=$m, nesterov=$n)", {"lr": 3e-4, "m": 0.9, "n": True})
    assert spec == "optax.sgd(0.0003, momentum=0.9, nesterov=True)"
    assert Distribution("loguniform", 1e-4, 1e-2).representative() == pytest.approx(1e-3)
    for bad, fragment in [("lr=loguniform(0,1)", "0 < LOW < HIGH"), ("lr=uniform(2,1)", "LOW < HIGH"),
                          ("lr=choice(1)", "two or more"), ("lr=int(1.5,3)", "whole-number"),
                          ("lr=normal(0,1)", "not a distribution"), ("1e-3", "NAME=VALUE"),
                          ("lr=1e-3,1e-3", "repeats")]:  # fmt: skip
        parse = parse_grid if bad.startswith("lr=1e-3,") else parse_space
        with pytest.raises(ConfigError, match=fragment):
            parse(bad)


def test_processes_name_the_same_study_whatever_their_lr_find_decided():
    from kithara_ops.study import default_study_name

    asked = {"sweep.optimizer.0": "optax.adamw($lr)", "sweep.space.lr": "lr-find"}
    here = default_study_name({**asked, "sweep.space.lr.0": "loguniform(0.0001,0.01)"})
    there = default_study_name({**asked, "sweep.space.lr.0": "loguniform(0.00011,0.011)"})
    assert here == there == default_study_name(asked)
    assert here != default_study_name({**asked, "sweep.trials": "6"})


HOSTILE = [
    ["--space", "lr=__import__('os').system('touch pwned')", "--trials", "2"],
    ["--space", "lr=loguniform(1e-5, __import__('os').getpid())", "--trials", "2"],
    ["--space", "lr=choice(print, 1)", "--trials", "2"],
    ["--grid", "lr=1e-3,open('pwned','w')"],
    ["--grid", "lr=[1e-3][0]"],
]


@pytest.mark.parametrize("design", HOSTILE, ids=[d[1][:40] for d in HOSTILE])
def test_a_space_that_tries_to_run_code_is_refused_in_one_line(design, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path}/runs.db"
    done = invoke("sweep", "--optimizer", "optax.adamw($lr)", *design, *FAST, "--tracking-uri", uri)
    assert done.exit_code == 2, done.output
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: ") and "Traceback" not in done.output
    assert "literal" in lines[0] or "not a distribution" in lines[0]
    assert not (tmp_path / "pwned").exists() and not (tmp_path / "runs.db").exists()


DESIGN_ERRORS = [
    (["--optimizer", "optax.adamw($lr)", "--grid", "b2=0.9,0.99"], "$lr but no --grid"),
    (["--optimizer", "optax.adamw($lr)", "--grid", "lr=1e-3,1e-2", "--grid", "b=1,2"], "named by no"),
    (["--optimizer", "optax.adamw($lr)", "--space", "lr=uniform(0,1)"], "needs --trials"),
    (["--optimizer", "optax.adamw($lr)", "--grid", "lr=1,2", "--space", "lr=uniform(0,1)"], "use one"),
    (["--optimizer", "optax.adamw($lr)", "--grid", "lr=1,2", "--prune", "median"], "belong to --trials"),
    (["--optimizer", "optax.adamw($lr)", "--space", "lr=uniform(0,1)", "--trials", "0"], "at least 1"),
    (["--optimizer", "optax.adamw(1e-3)", "--optimizer", "optax.sgd(1e-3)", "--trials", "3"], "no optimizer spec has"),
    (["--optimizer", "optax.adamw(1e-3)", "--optimizer", "optax.sgd(1e-3)", "--confirm-seeds", "0,1"], "belongs to a search"),
    (["--optimizer", "optax.adamw($lr)", "--grid", "lr=1,2", "--parallel", "2"], "--study-storage"),
    (["--optimizer", "optax.adamw($lr)", "--grid", "lr=1,2", "--seeds", "0,1"], "--confirm-seeds"),
    (["--optimizer", "optax.adamw($lr, b1=$b1)", "--grid", "lr=1e-3", "--grid", "b1=2"], "b1"),
    (["--optimizer", "optax.adamw($lr)", "--space", "lr=uniform(0.001,0.01)", "--trials", "2",
      "--study-storage", "nope://x"], "cannot be opened"),
]  # fmt: skip


@pytest.mark.parametrize(("args", "fragment"), DESIGN_ERRORS, ids=[f for _, f in DESIGN_ERRORS])
def test_a_search_that_cannot_run_is_refused_before_any_run(args, fragment, tmp_path):
    uri = f"sqlite:///{tmp_path}/runs.db"
    done = invoke("sweep", *args, *FAST, "--tracking-uri", uri)
    assert done.exit_code == 2, done.output
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and fragment in lines[0], lines
    if (tmp_path / "runs.db").exists():
        client = MlflowClient(uri)
        assert not client.search_runs([e.experiment_id for e in client.search_experiments()])


def test_a_search_without_held_out_data_is_refused(tmp_path):
    at = FAST.index("--eval-data")
    no_eval = FAST[:at] + FAST[at + 2 :]
    done = invoke("sweep", "--optimizer", "optax.adamw($lr)", "--grid", "lr=1e-3,1e-2", *no_eval,
                  "--tracking-uri", f"sqlite:///{tmp_path}/runs.db")  # fmt: skip
    assert done.exit_code == 2 and "eval_loss on held-out data" in done.stderr, done.output


# --------------------------------------------------------------- a grid, then confirmation
@pytest.fixture(scope="module")
def grid(tmp_path_factory):
    """adamw and Keras Adam over 3 learning rates, each best over seeds 0 and 1."""
    uri = f"sqlite:///{tmp_path_factory.mktemp('grid')}/runs.db"
    args = ["sweep", *[a for t in TEMPLATES for a in ("--optimizer", t)], "--grid",
            "lr=" + ",".join(map(repr, GRID)), "--confirm-seeds", "0,1", *FAST,
            "--experiment", "tuned", "--tracking-uri", uri, "--json"]  # fmt: skip
    done = invoke(*args)
    assert done.exit_code == 0, done.output
    return uri, json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_a_grid_trains_every_point_and_keeps_each_optimizers_best_by_eval_loss(grid):
    uri, printed = grid
    client = MlflowClient(uri)
    parent = client.get_run(printed["parent_run_id"])
    assert parent.info.status == "FINISHED"
    assert parent.data.params["sweep.grid.lr"] == "0.0001,0.003,0.1"
    assert parent.data.params["sweep.confirm_seeds"] == "0,1"
    runs = children(client, printed["parent_run_id"])
    search = [r for r in runs if r.data.tags.get(STAGE_TAG) == "search"]
    assert len(search) == 6 and all(r.info.status == "FINISHED" for r in search)
    by_group = {}
    for run in search:
        lr = float(run.data.params["search.lr"])
        assert run.data.params["group"] in {f"{g} (search)" for g in GROUPS}
        step, eval_loss = last(client, run.info.run_id, "eval_loss")
        assert step == STEPS
        by_group.setdefault(run.data.params["group"][: -len(" (search)")], []).append(
            (eval_loss, lr)
        )
    assert sorted(by_group) == sorted(GROUPS)
    for group, points in by_group.items():
        assert sorted(lr for _, lr in points) == GRID
        best_loss, best_lr = min(points)
        assert printed["best"][group]["values"] == {"lr": best_lr}
        assert printed["best"][group]["objective"] == pytest.approx(best_loss, rel=1e-6)
    assert len(printed["trials"]) == 6 and {t["state"] for t in printed["trials"]} == {"complete"}


@pytest.mark.slow
def test_each_best_is_confirmed_over_the_seeds_and_compared_by_group(grid):
    uri, printed = grid
    client = MlflowClient(uri)
    confirmed = [r for r in children(client, printed["parent_run_id"])
                 if r.data.tags.get(STAGE_TAG) == "confirm"]  # fmt: skip
    assert len(confirmed) == 4
    seen = set()
    for run in confirmed:
        group, seed = run.data.params["group"], int(run.data.params["seed"])
        seen.add((group, seed))
        best = printed["best"][group]
        assert run.data.params["optimizer.spec"] == best["spec"]
        assert run.data.params["search.lr"] == repr(best["values"]["lr"])
        assert run.info.run_name == f"{group} seed {seed}"
    assert seen == {(g, s) for g in GROUPS for s in (0, 1)}
    # The same seed as the search reproduces the search's best exactly.
    for group in GROUPS:
        again = next(r for r in confirmed if r.data.params["group"] == group
                     and int(r.data.params["seed"]) == 0)  # fmt: skip
        assert last(client, again.info.run_id, "eval_loss")[1] == pytest.approx(
            printed["best"][group]["objective"], rel=1e-5
        )
    assert sorted(g["group"] for g in printed["groups"]) == sorted(GROUPS)
    compared = invoke("compare", "--experiment", "tuned", "--tracking-uri", uri, "--parent",
                      printed["parent_run_id"], "--group", "--metric", "eval_loss", "--json")  # fmt: skip
    assert compared.exit_code == 0, compared.output
    groups = {g["group"]: g for g in json.loads(compared.stdout)}
    for group in GROUPS:
        assert groups[group]["n"] == 2 and groups[group]["seeds"] == [0, 1]
        assert groups[f"{group} (search)"]["n"] == 3


@pytest.mark.slow
@pytest.mark.parametrize("template", TEMPLATES)
def test_lr_find_suggests_a_rate_within_ten_times_the_grids_best(grid, template):
    uri, printed = grid
    group = GROUPS[TEMPLATES.index(template)]
    spec = template.replace("($lr)", "")  # a bare name: the rate is the test's schedule
    done = invoke("lr-find", "--optimizer", spec, "--model", "tiny", "--data", "synthetic",
                  "--seq-len", "16", "--batch-size", "4", "--no-system-metrics",
                  "--experiment", "lr-find", "--tracking-uri", uri, "--json")  # fmt: skip
    assert done.exit_code == 0, done.output
    test = json.loads(done.stdout.strip().splitlines()[-1])
    best_lr = printed["best"][group]["values"]["lr"]
    assert best_lr / 10 <= test["suggested_learning_rate"] <= best_lr * 10, (test, best_lr)
    # The rates grow by one factor per step from 1e-7 to 10 over 100 steps.
    rates = np.asarray(test["learning_rates"])
    assert rates[0] == pytest.approx(1e-7) and np.allclose(rates[1:] / rates[:-1], 10 ** (8 / 99))
    assert test["stopped"] == "diverged" and len(rates) < 100
    assert max(test["losses"]) <= 4 * min(test["losses"])
    client = MlflowClient(uri)
    run = client.get_run(test["run_id"])
    assert run.info.status == "FINISHED" and run.data.tags["kithara_ops.lr_find"] == "true"
    assert run.data.metrics["suggested_learning_rate"] == test["suggested_learning_rate"]
    logged = client.get_metric_history(test["run_id"], "lr_find.loss")
    assert [m.value for m in sorted(logged, key=lambda m: m.step)] == test["losses"]
    assert {a.path for a in client.list_artifacts(test["run_id"])} == {"lr_find.png"}
    assert test["space"].startswith("lr=loguniform(")


# ------------------------------------------------------------------------ lr-find, alone
def test_the_range_test_rewrites_only_the_learning_rate():
    from kithara_ops.lr_find import range_spec

    optax_schedule = "optax.exponential_decay(init_value=1e-06, transition_steps=1, decay_rate="
    keras_schedule = "keras.optimizers.schedules.ExponentialDecay(initial_learning_rate=1e-06"
    assert range_spec("optax.adamw", 1e-6, 1.0, 7).startswith("optax.adamw(" + optax_schedule)
    assert range_spec("keras.optimizers.Adam", 1e-6, 1.0, 7).startswith(
        "keras.optimizers.Adam(" + keras_schedule
    )
    kw = range_spec("optax.adamw(learning_rate=1e-3, weight_decay=0.1)", 1e-6, 1.0, 7)
    assert kw.startswith("optax.adamw(learning_rate=" + optax_schedule) and "weight_decay=0.1" in kw
    chain = range_spec("optax.chain(optax.clip_by_global_norm(1.0), optax.sgd(0.1, momentum=0.9))",
                       1e-6, 1.0, 7)  # fmt: skip
    assert "optax.sgd(" + optax_schedule in chain and "clip_by_global_norm(1.0)" in chain
    assert "momentum=0.9" in chain and "10.0" not in chain
    lion = range_spec("optax.lion($lr)", 1e-6, 1.0, 7)
    assert float(lion.split("decay_rate=")[1].rstrip(")")) == pytest.approx(10.0)  # 1e6 ** (1/6)
    with pytest.raises(ConfigError, match=r"write \$lr"):
        range_spec("optax.chain(optax.scale_by_adam(), optax.scale(-1e-3))", 1e-6, 1.0, 7)
    with pytest.raises(ConfigError, match="start < end"):
        range_spec("optax.adamw", 1.0, 1e-6, 7)


def test_the_suggestion_is_the_steepest_descent_of_the_smoothed_loss():
    from kithara_ops.lr_find import smooth, suggest

    assert smooth([2.0, 4.0], beta=0.5) == [2.0, pytest.approx((0.5 * 1 + 0.5 * 4) / 0.75)]
    rates = list(np.logspace(-6, 0, 61))
    # Flat, then falling fastest around 1e-3, lowest at 1e-2, then rising.
    curve = [3 - 2 / (1 + math.exp(-4 * (math.log10(r) + 3))) + max(0, math.log10(r) + 2) ** 2
             for r in rates]  # fmt: skip
    steepest, lowest = suggest(rates, curve)
    assert steepest == pytest.approx(1e-3, rel=0.3) and lowest == pytest.approx(1e-2, rel=0.3)
    with pytest.raises(ConfigError, match="start lower"):
        suggest(rates[:2], curve[:2])


def test_the_range_test_leaves_the_models_weights_as_they_were():
    import keras

    from kithara_ops import data, models
    from kithara_ops.lr_find import range_spec, run_range_test
    from kithara_ops.optim.spec import build_optimizer
    from kithara_ops.trainer import Trainer

    model = models.resolve_model("tiny", vocab_size=data.ByteTokenizer().vocab_size, seq_len=16)
    before = [np.array(w) for w in model.weights]
    spec = range_spec("optax.adamw", 1e-5, 10.0, 40)
    batches = data.load("synthetic", seq_len=16, batch_size=4, seed=0)
    trainer = Trainer(model, build_optimizer(spec), batches, steps=40, tracking=False)
    test = run_range_test(trainer, 1e-5, 10.0, 40, 4.0, spec)
    assert 3 <= len(test.losses) <= 40 and test.losses[0] != test.losses[-1]
    assert all(np.array_equal(a, np.array(w)) for a, w in zip(before, model.weights))
    keras.backend.clear_session()


# ------------------------------------------------------------------ Optuna, and pruning
@pytest.mark.slow
def test_an_optuna_search_prunes_hopeless_trials_as_killed_runs(tmp_path):
    uri = f"sqlite:///{tmp_path}/runs.db"
    done = invoke("sweep", "--optimizer", "optax.adamw($lr)", "--space",
                  "lr=loguniform(1e-5,3e-1)", "--trials", "6", "--prune", "median", *FAST,
                  "--experiment", "pruned", "--tracking-uri", uri, "--json")  # fmt: skip
    assert done.exit_code == 0, done.output
    printed = json.loads(done.stdout.strip().splitlines()[-1])
    trials = printed["trials"]
    assert sorted(t["number"] for t in trials) == list(range(6))
    pruned = [t for t in trials if t["state"] == "pruned"]
    complete = [t for t in trials if t["state"] == "complete"]
    assert pruned and len(pruned) + len(complete) == 6
    client = MlflowClient(uri)
    runs = {r.info.run_id: r for r in children(client, printed["parent_run_id"])}
    assert len(runs) == 6 and {r.data.tags[STAGE_TAG] for r in runs.values()} == {"search"}
    for trial in pruned:
        run = runs[trial["run_id"]]
        assert run.info.status == "KILLED"
        assert int(run.data.params["pruned_at_step"]) == trial["pruned_at_step"] < STEPS
        assert last(client, trial["run_id"], "eval_loss")[0] == trial["pruned_at_step"]
        assert run.data.tags["kithara_ops.stop_reason"] == "pruned"
    for trial in complete:
        run = runs[trial["run_id"]]
        assert run.info.status == "FINISHED" and "pruned_at_step" not in run.data.params
        assert last(client, trial["run_id"], "eval_loss") == (
            STEPS,
            pytest.approx(trial["objective"]),
        )
        assert 1e-5 <= float(run.data.params["search.lr"]) <= 3e-1
    best = min(complete, key=lambda t: t["objective"])
    assert printed["best"]["optax:adamw"]["number"] == best["number"]
    assert client.get_run(printed["parent_run_id"]).data.params["sweep.space.lr"] == (
        "loguniform(1e-05,0.3)"
    )


def two_sweeps(storage: str, tracking_uri: str, cwd, trials: int) -> list:
    """Two ``sweep`` processes started together on one study; their finished processes."""
    args = [sys.executable, "-m", "kithara_ops.cli", "sweep", "--optimizer", "optax.adamw($lr)",
            "--space", "lr=loguniform(1e-4,1e-1)", "--trials", str(trials), "--prune", "median",
            "--study-storage", storage, *FAST, "--experiment", "shared", "--tracking-uri",
            tracking_uri, "--json"]  # fmt: skip
    # One device per process: two trainings share the machine's cores.
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
    procs = [subprocess.Popen(args, cwd=cwd, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]  # fmt: skip
    outs = [p.communicate(timeout=300) for p in procs]
    for proc, (out, err) in zip(procs, outs):
        assert proc.returncode == 0, out + err
    return [json.loads(out.strip().splitlines()[-1]) for out, _ in outs]


def check_shared_search(client, printed: list, trials: int) -> None:
    """One parent, every trial trained exactly once by one of the processes."""
    parents = {p["parent_run_id"] for p in printed}
    assert len(parents) == 1
    runs = children(client, parents.pop())
    numbers = sorted(int(r.data.tags["kithara_ops.trial"]) for r in runs)
    assert numbers == list(range(trials))  # none missing, none twice
    assert all(r.info.status in ("FINISHED", "KILLED") for r in runs)
    finished = [p for p in printed if p["ui"] is not None]
    assert len(finished) == 1  # the one that ended the search and logged the report
    assert sorted(t["number"] for t in finished[0]["trials"]) == list(range(trials))
    assert {t["run_id"] for t in finished[0]["trials"]} == {r.info.run_id for r in runs}
    parent = client.get_run(runs[0].data.tags["mlflow.parentRunId"])
    assert parent.info.status == "FINISHED"


@pytest.mark.slow
def test_two_processes_fill_one_sqlite_study_each_trial_once(tmp_path):
    """Real processes: the study storage is what they share."""
    uri = f"sqlite:///{tmp_path}/runs.db"
    MlflowClient(uri).search_experiments()  # the store exists before two processes open it
    printed = two_sweeps(f"sqlite:///{tmp_path}/study.db", uri, tmp_path, trials=6)
    check_shared_search(MlflowClient(uri), printed, trials=6)
    import optuna

    summaries = optuna.get_all_study_summaries(f"sqlite:///{tmp_path}/study.db")
    lead, per_optimizer = sorted(summaries, key=lambda s: s.study_name)
    assert per_optimizer.study_name == lead.study_name + "/optax:adamw"
    assert lead.user_attrs["mlflow_parent_run_id"] == printed[0]["parent_run_id"]


@pytest.mark.slow
def test_the_sweeps_report_shows_each_optimizers_sensitivity_to_the_rate(grid, tmp_path):
    import html
    import re

    from kithara_ops.tracking.report import REPORT_ARTIFACT

    uri, printed = grid
    path = MlflowClient(uri).download_artifacts(printed["parent_run_id"], REPORT_ARTIFACT, tmp_path)
    page = Path(path).read_text(encoding="utf-8")
    table = page.split("<table id='sensitivity'>", 1)[1].split("</table>", 1)[0]
    rows = {}
    for group, row in re.findall(r"<tr data-group='([^']*)'>(.*?)</tr>", table, flags=re.S):
        values = [json.loads(html.unescape(v)) for v in re.findall(r'data-value="([^"]*)"', row)]
        rows[html.unescape(group)] = values
    assert sorted(rows) == sorted(GROUPS)
    for group, (name, hyper, trials, pruned, best_value, best_loss, spread) in rows.items():
        assert (name, hyper, trials, pruned) == (group, "lr", 3, 0)
        assert best_value == printed["best"][group]["values"]["lr"]
        assert best_loss == pytest.approx(printed["best"][group]["objective"], rel=1e-6)
        losses = [t["objective"] for t in printed["trials"] if t["group"] == group]
        assert spread == pytest.approx(max(losses) - min(losses), rel=1e-6)
    assert "final eval_loss against each tuned hyperparameter" in page


@pytest.mark.slow
def test_a_space_of_lr_find_searches_a_decade_around_each_optimizers_suggestion(tmp_path):
    uri = f"sqlite:///{tmp_path}/runs.db"
    done = invoke("sweep", "--optimizer", "optax.sgd($lr, momentum=$m)", "--space", "lr=lr-find",
                  "--space", "m=choice(0.9)", "--trials", "2", *FAST, "--tracking-uri", uri,
                  "--json")  # fmt: skip
    assert done.exit_code == 2 and "two or more" in done.stderr  # choice(0.9) is no choice
    done = invoke("sweep", "--optimizer", "optax.sgd($lr, momentum=$m)", "--space", "lr=lr-find",
                  "--space", "m=choice(0.5,0.9)", "--trials", "2", *FAST, "--tracking-uri", uri,
                  "--json")  # fmt: skip
    assert done.exit_code == 0, done.output
    printed = json.loads(done.stdout.strip().splitlines()[-1])
    found = invoke("lr-find", "--optimizer", "optax.sgd($lr, momentum=0.5)", *FAST[:4],
                   "--seq-len", "16", "--batch-size", "4", "--no-tracking", "--json")  # fmt: skip
    suggested = json.loads(found.stdout.strip().splitlines()[-1])["suggested_learning_rate"]
    params = MlflowClient(uri).get_run(printed["parent_run_id"]).data.params
    assert params["sweep.space.lr"] == "lr-find"
    low, high = map(float, params["sweep.space.lr.0"][len("loguniform(") : -1].split(","))
    assert (low, high) == (pytest.approx(suggested / 10), pytest.approx(suggested * 10))
    assert len(printed["trials"]) == 2
    assert all(low <= t["values"]["lr"] <= high for t in printed["trials"])
