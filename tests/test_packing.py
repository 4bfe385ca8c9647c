"""Packing with document masking: segment ids and positions per document, attention kept
within a document, one document per row for models that cannot keep them apart."""

import json

import numpy as np
import optax
import pytest
from mlflow.tracking import MlflowClient
from typer.testing import CliRunner

from kithara_ops import Trainer
from kithara_ops.cli import app
from kithara_ops.data import ByteTokenizer, Document, load, pack

TOKENIZER = ByteTokenizer()


def ids(text):
    return [TOKENIZER.bos_id, *TOKENIZER.encode(text), TOKENIZER.eos_id]


def test_two_packed_documents_get_the_logits_each_gets_alone(make_model):
    model = make_model(seed=3)
    first, second = ids("def f(x): return x"), ids("import os, sys")
    length = 48
    row = np.full((1, length), TOKENIZER.pad_id, "int32")
    row[0, : len(first)], row[0, len(first) : len(first) + len(second)] = first, second
    segments = np.zeros((1, length), "int32")
    segments[0, : len(first)], segments[0, len(first) : len(first) + len(second)] = 1, 2
    positions = np.zeros((1, length), "int32")
    positions[0, : len(first)] = np.arange(len(first))
    positions[0, len(first) : len(first) + len(second)] = np.arange(len(second))
    packed = np.asarray(model(row, segment_ids=segments, positions=positions))[0]
    for doc, start in ((first, 0), (second, len(first))):
        alone = np.zeros((1, length), "int32")
        alone[0, : len(doc)] = doc
        expected = np.asarray(model(alone))[0, : len(doc)]
        np.testing.assert_allclose(packed[start : start + len(doc)], expected, atol=2e-5)
    # Without the segments the second document sees the first: its logits change.
    concat = np.asarray(model(row))[0]
    assert (
        np.abs(
            concat[len(first) : len(first) + len(second)]
            - packed[len(first) : len(first) + len(second)]
        ).max()
        > 1e-3
    )


def test_documents_packing_marks_segments_restarts_positions_and_trains_no_crossing_target():
    docs = [Document("abcdefghij"), Document("xyz"), Document("0123456789abcdef")]
    plain, kept = pack(docs, TOKENIZER, 8), pack(docs, TOKENIZER, 8, "documents")
    np.testing.assert_array_equal(kept.x, plain.x)  # the same rows: no space is lost
    stream = np.concatenate([ids(d.text) for d in docs])
    doc_of = np.repeat(np.arange(3), [len(ids(d.text)) for d in docs])
    flat = kept.segment_ids.reshape(-1)[: len(stream)]
    for row in range(len(kept.x)):
        seen = doc_of[row * 8 : row * 8 + 8]
        assert list(kept.segment_ids[row, : len(seen)]) == list(seen - seen[0] + 1)
    starts = {0: 0, 1: 12, 2: 17}
    positions = kept.positions.reshape(-1)[: len(stream)]
    assert list(positions) == [i - starts[d] for i, d in enumerate(doc_of)]
    assert (flat > 0).all()
    # A target in the next document is not trained; every other target is as before.
    crossing = np.flatnonzero(np.diff(doc_of))  # the last token of documents 0 and 1
    assert all(kept.mask.reshape(-1)[i] == 0 and plain.mask.reshape(-1)[i] == 1 for i in crossing)
    others = np.setdiff1d(np.arange(len(stream) - 1), crossing)
    np.testing.assert_array_equal(kept.mask.reshape(-1)[others], plain.mask.reshape(-1)[others])


def test_an_unknown_packing_is_a_one_line_error():
    from kithara_ops.errors import ConfigError

    with pytest.raises(ConfigError, match="packing must be one of concat, documents, none"):
        pack([Document("abc")], TOKENIZER, 8, "documnets")


def test_none_packing_starts_every_document_on_its_own_rows():
    docs = [Document("abc"), Document("x" * 20)]
    rows = pack(docs, TOKENIZER, 8, "none")
    assert [int(row[0]) for row in rows.x[:2]] == [TOKENIZER.bos_id, TOKENIZER.bos_id]
    assert list(rows.segment_ids[0]) == [1] * 4 + [0] * 4  # bos a b c, then padding
    assert list(rows.x[0, 4:]) == [TOKENIZER.pad_id] * 4 and rows.mask[0, 4:].sum() == 0
    # The long document (22 tokens) takes three rows, its positions running on.
    assert len(rows.x) == 4
    assert list(rows.positions[2]) == list(range(8, 16))
    assert rows.segment_ids[3].sum() == 22 - 1 - 16


def test_a_documents_run_logs_the_real_token_fraction(make_model, tmp_path):
    data = load("synthetic", seq_len=32, batch_size=8, packing="documents")
    first = next(iter(data))
    assert set(first) == {"x", "y", "mask", "segment_ids", "positions"}
    uri = f"sqlite:///{tmp_path}/m.db"
    result = Trainer(make_model(), optax.adam(1e-3), data, steps=3, log_every=1,
                     tracking_uri=uri, system_metrics=False, packing="documents").train()  # fmt: skip
    history = MlflowClient(uri).get_metric_history(result.run_id, "packing.real_token_fraction")
    assert [m.step for m in history] == [1, 2, 3] and all(0 < m.value <= 1 for m in history)
    params = MlflowClient(uri).get_run(result.run_id).data.params
    assert params["packing"] == "documents"


def test_documents_packing_for_a_model_that_cannot_keep_them_apart_exits_2(tiny_presets, tmp_path):
    (tmp_path / "corpus.txt").write_text("The quick brown fox. " * 200)
    done = CliRunner().invoke(app, [
        "train", "--model", str(tiny_presets["gpt2"]), "--data", str(tmp_path / "corpus.txt"),
        "--packing", "documents", "--seq-len", "16", "--batch-size", "2", "--steps", "1",
        "--no-tracking",
    ])  # fmt: skip
    assert done.exit_code == 2
    (line,) = done.stderr.strip().splitlines()
    assert "packing 'documents'" in line and "--packing none" in line
    plan = CliRunner().invoke(app, ["train", "--packing", "documents", "--dry-run", "--json"])
    assert plan.exit_code == 0 and json.loads(plan.stdout)["batch"] > 0
