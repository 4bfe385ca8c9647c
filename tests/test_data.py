"""Tests for ``kithara_ops.data``: tokenizer, sources, packing and the batch iterator."""

from __future__ import annotations

import json

import numpy as np
import pytest

from kithara_ops.data import (
    ByteTokenizer,
    Dataset,
    Document,
    Packed,
    load,
    pack,
    read_documents,
)
from kithara_ops.data.sources import STDLIB_BYTE_BUDGET
from kithara_ops.errors import ConfigError

TOK = ByteTokenizer()
BOS, EOS, PAD = TOK.bos_id, TOK.eos_id, TOK.pad_id


def ids(text: str) -> list[int]:
    return list(text.encode("utf-8"))


def numbered(n: int, seq_len: int = 3) -> Packed:
    """Sequences whose every token is the row number, so batches show the order."""
    x = np.repeat(np.arange(n, dtype=np.int32)[:, None], seq_len, axis=1)
    return Packed(x, x + 1000, np.ones((n, seq_len), np.float32))


def rows(batch: dict[str, np.ndarray]) -> list[int]:
    return batch["x"][:, 0].tolist()


def take(it, k: int) -> list[dict[str, np.ndarray]]:
    return [next(it) for _ in range(k)]


# --- tokenizer ---------------------------------------------------------------------------


def test_tokenizer_constants():
    assert (TOK.pad_id, TOK.bos_id, TOK.eos_id, TOK.vocab_size) == (256, 257, 258, 259)
    assert ByteTokenizer.vocab_size == 259


def test_tokenizer_round_trip_non_ascii():
    text = "héllo wörld — 日本語 🎉\n"
    encoded = TOK.encode(text)
    assert encoded.dtype == np.int32
    assert encoded.tolist() == ids(text)
    assert len(encoded) == len(text.encode("utf-8")) > len(text)
    assert TOK.decode(encoded) == text
    assert TOK.encode("").shape == (0,)


def test_tokenizer_decode_drops_specials_and_replaces_bad_bytes():
    assert TOK.decode([BOS, *ids("ab"), EOS, PAD, PAD]) == "ab"
    # A multi-byte character cut in half decodes to U+FFFD instead of raising.
    assert TOK.decode(ids("é")[:1] + ids("x")) == "\ufffdx"


# --- packing -----------------------------------------------------------------------------


def test_pack_shift_and_document_boundaries():
    docs = [Document("hello"), Document("world!")]
    packed = pack(docs, TOK, seq_len=4)
    stream = [BOS, *ids("hello"), EOS, BOS, *ids("world!"), EOS]  # 15 tokens
    assert len(stream) == 15
    # 14 targets -> 3 full windows of 4 plus a padded one holding the last 2 targets.
    assert packed.x.shape == packed.y.shape == packed.mask.shape == (4, 4)
    assert packed.x.dtype == packed.y.dtype == np.int32
    assert packed.mask.dtype == np.float32
    np.testing.assert_array_equal(packed.y[:, :-1], packed.x[:, 1:])
    np.testing.assert_array_equal(packed.y[:-1, -1], packed.x[1:, 0])
    assert packed.x.reshape(-1)[:12].tolist() == stream[:12]
    assert packed.y.reshape(-1)[:14].tolist() == stream[1:]
    assert packed.x[0, 0] == BOS
    assert packed.y[1].tolist() == [ids("o")[0], EOS, BOS, ids("w")[0]]
    assert packed.x[3].tolist() == [*ids("d!"), EOS, PAD]
    assert packed.y[3].tolist() == [ids("!")[0], EOS, PAD, PAD]
    assert packed.mask[:3].tolist() == [[1.0] * 4] * 3
    assert packed.mask[3].tolist() == [1.0, 1.0, 0.0, 0.0]


def test_pack_prompt_masked_completion_and_eos_trained():
    packed = pack([Document("cd", prompt="ab")], TOK, seq_len=8)
    a, b, c, d = ids("abcd")
    assert packed.x.tolist() == [[BOS, a, b, c, d, EOS, PAD, PAD]]
    assert packed.y.tolist() == [[a, b, c, d, EOS, PAD, PAD, PAD]]
    # Targets a, b are prompt (0); c (first completion token), d and eos are trained;
    # padding is 0.
    assert packed.mask.tolist() == [[0, 0, 1, 1, 1, 0, 0, 0]]


def test_pack_exact_fit_has_no_padding_row():
    packed = pack([Document("abc")], TOK, seq_len=2)  # 5 tokens, 4 targets
    assert packed.x.tolist() == [[BOS, *ids("a")], ids("bc")]
    assert packed.y.tolist() == [ids("ab"), [ids("c")[0], EOS]]
    assert packed.mask.sum() == 4
    assert PAD not in packed.x


def test_pack_rejects_bad_seq_len_and_no_data():
    with pytest.raises(ConfigError, match="seq_len must be a positive integer, got 0"):
        pack([Document("abc")], TOK, seq_len=0)
    with pytest.raises(ConfigError, match="seq_len 8"):
        pack([], TOK, seq_len=8)


# --- sources -----------------------------------------------------------------------------


def test_stdlib_source_deterministic_and_within_budget():
    first = read_documents("stdlib")
    assert len(first) > 50
    total = sum(len(doc.text.encode("utf-8")) for doc in first)
    assert STDLIB_BYTE_BUDGET // 2 < total <= STDLIB_BYTE_BUDGET
    assert all(doc.prompt == "" for doc in first)
    assert read_documents("stdlib") == first


def test_synthetic_source_deterministic():
    docs = read_documents("synthetic")
    assert read_documents("synthetic") == docs
    lines = [line for doc in docs for line in doc.text.splitlines()]
    assert len(lines) == 3000
    sums = [line for line in lines if "+" in line]
    a, rest = sums[0].split(" + ")
    b, total = rest.split(" = ")
    assert int(a) + int(b) == int(total)


def test_text_file_directory_and_glob_sources(tmp_path):
    (tmp_path / "b.txt").write_text("second")
    (tmp_path / "a.md").write_text("first")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "c.py").write_text("third")
    (tmp_path / "sub" / "blob.bin").write_bytes(b"\0\1\2")
    (tmp_path / ".hidden").write_text("skipped")
    assert read_documents(str(tmp_path / "b.txt")) == [Document("second")]
    assert [d.text for d in read_documents(str(tmp_path))] == ["first", "second", "third"]
    assert [d.text for d in read_documents(str(tmp_path / "*.txt"))] == ["second"]
    assert [d.text for d in read_documents(str(tmp_path / "**" / "*.py"))] == ["third"]


def test_jsonl_text_and_prompt_completion(tmp_path):
    path = tmp_path / "data.jsonl"
    lines = [{"text": "plain"}, {"prompt": "Q: 1+1?", "completion": " 2"}]
    path.write_text("\n".join(json.dumps(line) for line in lines) + "\n\n")
    assert read_documents(str(path)) == [Document("plain"), Document(" 2", prompt="Q: 1+1?")]


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ("{not json", "line 2 is not valid JSON"),
        ('{"prompt": "p"}', "line 2 has no string"),
        ('{"text": "x", "n": %s}' % ("9" * 5000), "line 2 is not valid JSON .an integer of more"),
        ('{"text": ' + "[" * 5000 + "]" * 5000 + "}", "line 2 is not valid JSON .arrays or"),
        ("[" * 100000, "line 2 is not valid JSON .arrays or objects nested too deeply"),
    ],
)
def test_jsonl_bad_line_names_file_and_line(tmp_path, line, expected):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "ok"}\n' + line + "\n")
    with pytest.raises(ConfigError, match=expected) as err:
        read_documents(str(path))
    assert "bad.jsonl" in str(err.value)
    assert "\n" not in str(err.value)


def test_source_errors_name_the_bad_value(tmp_path):
    missing = str(tmp_path / "nope.txt")
    with pytest.raises(ConfigError, match="does not exist") as err:
        read_documents(missing)
    assert missing in str(err.value)
    with pytest.raises(ConfigError, match="matches no file"):
        read_documents(str(tmp_path / "*.xyz"))
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    with pytest.raises(ConfigError, match="has no text") as err:
        read_documents(str(empty))
    assert "empty.txt" in str(err.value)


# --- dataset and iterator ----------------------------------------------------------------


def test_load_batches_shapes_and_dtypes():
    ds = load("synthetic", seq_len=32, batch_size=4, seed=0)
    assert len(ds) == len(ds.packed.x) // 4 > 100
    batch = next(iter(ds))
    assert set(batch) == {"x", "y", "mask"}
    for key, dtype in (("x", np.int32), ("y", np.int32), ("mask", np.float32)):
        assert batch[key].dtype == dtype
        assert batch[key].shape == (4, 32)
    np.testing.assert_array_equal(batch["y"][:, :-1], batch["x"][:, 1:])


def test_load_accepts_documents():
    ds = load([Document("abcdefgh")] * 4, seq_len=4, batch_size=2, shuffle=False)
    assert len(ds.packed.x) == 10  # 4 docs * 10 tokens = 40 tokens, 39 targets
    assert len(ds) == 5


def test_same_seed_same_order_other_seed_differs():
    def first_epochs(seed: int) -> list[list[int]]:
        it = iter(Dataset(numbered(40), batch_size=4, seed=seed))
        return [rows(b) for b in take(it, 20)]

    assert first_epochs(7) == first_epochs(7)
    assert first_epochs(7) != first_epochs(8)
    assert first_epochs(7)[:10] != [list(range(i, i + 4)) for i in range(0, 40, 4)]


def test_epochs_cover_data_and_reshuffle():
    ds = Dataset(numbered(10), batch_size=3, seed=0)
    assert len(ds) == 3  # one sequence per epoch is left out
    it = iter(ds)
    assert it.epoch == 0
    epochs = []
    for expected_epoch in range(4):
        assert it.epoch == expected_epoch
        seen = [row for b in take(it, 3) for row in rows(b)]
        assert len(set(seen)) == 9 and set(seen) <= set(range(10))
        epochs.append(seen)
    assert it.epoch == 4
    assert len({tuple(seen) for seen in epochs}) == 4  # every epoch a new order


@pytest.mark.parametrize("consumed", [0, 1, 2, 3, 4, 7])
def test_restore_matches_uninterrupted(consumed):
    ds = Dataset(numbered(10), batch_size=3, seed=3)
    reference = iter(ds)
    take(reference, consumed)
    state = reference.get_state()
    assert state["next_batch"] == consumed
    restored_state = json.loads(json.dumps(state))
    assert restored_state == state

    resumed = iter(Dataset(numbered(10), batch_size=3, seed=3))
    resumed.set_state(restored_state)
    assert resumed.epoch == consumed // 3
    for want, got in zip(take(reference, 2 * len(ds)), take(resumed, 2 * len(ds)), strict=True):
        for key in ("x", "y", "mask"):
            np.testing.assert_array_equal(want[key], got[key])
    assert resumed.get_state() == reference.get_state()


def test_set_state_rejects_other_data_or_bad_state():
    state = iter(Dataset(numbered(10), batch_size=3)).get_state()
    with pytest.raises(ConfigError, match="batches_per_epoch=3"):
        iter(Dataset(numbered(10), batch_size=2)).set_state(state)
    with pytest.raises(ConfigError, match="next_batch"):
        iter(Dataset(numbered(10), batch_size=3)).set_state({"next_batch": -1})


def test_eval_dataset_single_ordered_pass():
    ds = Dataset(numbered(10), batch_size=3, shuffle=False, repeat=False)
    it = iter(ds)
    assert [rows(b) for b in it] == [[0, 1, 2], [3, 4, 5], [6, 7, 8]]
    assert it.epoch == 1
    with pytest.raises(StopIteration):
        next(it)
    # A fresh iterator starts a new pass.
    assert len(list(ds)) == 3


def test_batch_size_larger_than_data():
    with pytest.raises(ConfigError, match="batch_size 11 is larger than the 10 sequences"):
        Dataset(numbered(10), batch_size=11)
    with pytest.raises(ConfigError, match="batch_size 64"):
        load([Document("short")], seq_len=4, batch_size=64)
