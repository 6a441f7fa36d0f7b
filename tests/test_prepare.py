"""Shard preparation: exact tokens against an independent tokenization, every input format, resume after
kill -9 (byte-identical), damaged shards, refusals and one-line errors for bad input."""

from __future__ import annotations

import gzip
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from support import ROOT, run_python

from gpt2.errors import UserError
from gpt2.prepare import PrepareConfig, prepare, tokenize_unit
from gpt2.tokenizer import EOT_ID, get_encoding

BIG = " ".join(f"word{i} ünïcödé {i * 7919 % 1000}" for i in range(120))  # ~900 tokens: spans several shards
DOCS = [
    "Hello world! The first document.",
    "",
    "Ünïcödé: 日本語のテキスト, emoji 🦀🚀, Ελληνικά, עברית, combining e\u0301.",
    "   \n\t  ",
    "A literal <|endoftext|> inside the text stays text, and so does <|endoftext|>.",
    BIG,
    "Windows line\r\nendings\r\nkept as they are.",
    "\u3000\u2003",  # Unicode whitespace only: empty too
    "Last one, with a trailing newline.\n",
]


def reference(docs: list[str]) -> np.ndarray:
    """An independent tokenization: ``[EOT] + encode_ordinary(doc)`` per non-blank document, in a plain loop."""
    enc = get_encoding()
    ids: list[int] = []
    for doc in docs:
        if doc.strip():
            ids += [EOT_ID, *enc.encode_ordinary(doc)]
    return np.array(ids, dtype=np.uint16)


def read_output(out: Path, shard_tokens: int, val_tokens: int) -> tuple[dict, np.ndarray]:
    """The manifest and all shards concatenated, after checking file names, dtypes, sizes and sha256s."""
    manifest = json.loads((out / "manifest.json").read_text())
    shards = manifest["shards"]
    assert [s["file"] for s in shards] == ["val_000000.npy"] + [f"train_{i:06d}.npy" for i in range(1, len(shards))]
    assert sorted(p.name for p in out.iterdir()) == sorted([s["file"] for s in shards] + ["manifest.json"])
    arrays = [np.load(out / s["file"]) for s in shards]
    for s, a in zip(shards, arrays):
        assert a.dtype == np.uint16 and a.ndim == 1 and len(a) == s["tokens"]
    assert [len(a) for a in arrays[:-1]] == [val_tokens] + [shard_tokens] * (len(arrays) - 2)
    assert 0 < len(arrays[-1]) <= shard_tokens
    from gpt2.files import file_sha256

    assert all(file_sha256(out / s["file"]) == s["sha256"] for s in shards)
    return manifest, np.concatenate(arrays)


def write_input(tmp_path: Path, kind: str, docs: list[str]) -> list[str]:
    """``docs`` as input files of one kind; returns the --input arguments."""
    if kind == "txt":
        folder = tmp_path / "txt"
        folder.mkdir()
        for i, doc in enumerate(docs):
            (folder / f"doc_{i:03d}.txt").write_bytes(doc.encode())
        return [str(folder)]
    if kind == "parquet":  # two files, small row groups: resume skips whole files and row groups
        half = len(docs) // 2
        for name, part in (("a", docs[:half]), ("b", docs[half:])):
            pq.write_table(pa.table({"id": list(range(len(part))), "text": part}), tmp_path / f"{name}.parquet",
                           row_group_size=2)  # fmt: skip
        return [str(tmp_path / "*.parquet")]
    lines = "".join(json.dumps({"id": i, "text": doc}) + "\n" + ("\n" if i == 3 else "") for i, doc in enumerate(docs))
    if kind == "jsonl.gz":
        path = tmp_path / "docs.jsonl.gz"
        path.write_bytes(gzip.compress(lines.encode()))
    else:
        path = tmp_path / "docs.jsonl"
        path.write_text(lines)
    return [str(path)]


def run(tmp_path: Path, inputs: list[str], name: str = "out", **kw) -> tuple[dict, Path]:
    cfg = PrepareConfig(out=tmp_path / name, input=inputs, **{"shard_tokens": 300, "workers": 1, **kw})
    return prepare(cfg), cfg.out


@pytest.mark.parametrize("kind, workers", [("jsonl", 1), ("jsonl.gz", 2), ("parquet", 2), ("txt", 1)])
def test_shards_equal_independent_tokenization(tmp_path, kind, workers):
    inputs = write_input(tmp_path, kind, DOCS)
    manifest, out = run(tmp_path, inputs, val_shard_tokens=100, batch_chars=200, workers=workers)
    _, tokens = read_output(out, 300, 100)
    expected = reference(DOCS)
    np.testing.assert_array_equal(tokens, expected)
    assert manifest["complete"] and manifest["tokens"] == len(expected)
    assert (manifest["docs_read"], manifest["docs_skipped_empty"], manifest["docs_skipped_bad"]) == (9, 3, 0)
    assert manifest["source"]["kind"] == "files" and manifest["eot_id"] == EOT_ID and manifest["dtype"] == "uint16"
    # the big document straddles shards: some shard starts inside it, after tokens already written
    assert any(s["start"]["offset"] > 0 for s in manifest["shards"])


def test_literal_eot_and_lone_surrogate(tmp_path):
    """``<|endoftext|>`` in text is text (not id 50256); a lone surrogate from JSON is replaced as tiktoken does."""
    docs = ["a <|endoftext|> b", "broken \ud800 surrogate"]
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))  # json escapes the surrogate
    _, out = run(tmp_path, [str(path)], shard_tokens=4, val_shard_tokens=4)
    _, tokens = read_output(out, 4, 4)
    np.testing.assert_array_equal(tokens, reference(docs))
    assert (tokens == EOT_ID).sum() == 2


@pytest.mark.slow
def test_real_corpus_workers_and_batches_do_not_change_bytes(tmp_path, shared_data):
    """Real text through the CLI with 2 worker processes = the library with 1 worker and other batches."""
    corpus = shared_data / "corpus"
    inputs = [str(corpus / "fineweb_edu_sample10BT_150docs.jsonl"), str(corpus / "dolma_ccnet_cc_en_head-0091.jsonl")]
    docs = [json.loads(line)["text"] for name in inputs for line in open(name, encoding="utf-8")]
    args = ["--input", *inputs, "--out", tmp_path / "cli", "--shard-tokens", 7000, "--val-shard-tokens", 5000]
    r = run_python(ROOT / "prepare_fineweb.py", *args, "--workers", 2, "--batch-chars", 30000)
    assert r.returncode == 0, r.stderr
    assert "160 documents" in r.stdout
    manifest, tokens = read_output(tmp_path / "cli", 7000, 5000)
    np.testing.assert_array_equal(tokens, reference(docs))
    _, out = run(tmp_path, inputs, name="lib", shard_tokens=7000, val_shard_tokens=5000, batch_chars=1 << 30)
    for f in sorted((tmp_path / "cli").iterdir()):
        assert f.read_bytes() == (out / f.name).read_bytes(), f.name


def test_max_docs_and_max_tokens(tmp_path):
    inputs = write_input(tmp_path, "jsonl", DOCS)
    manifest, out = run(tmp_path, inputs, name="docs", max_docs=3, val_shard_tokens=10, shard_tokens=20, batch_chars=10)
    _, tokens = read_output(out, 20, 10)
    np.testing.assert_array_equal(tokens, reference(DOCS[:5]))  # 3 documents, 2 empty ones between them
    assert (manifest["docs_read"], manifest["docs_skipped_empty"]) == (5, 2)
    manifest, out = run(tmp_path, inputs, name="tokens", max_tokens=555, val_shard_tokens=100, batch_chars=50)
    _, tokens = read_output(out, 300, 100)
    np.testing.assert_array_equal(tokens, reference(DOCS)[:555])  # cut inside the big document
    assert manifest["tokens"] == 555 and manifest["docs_read"] == 6


def test_skip_bad_skips_and_counts(tmp_path):
    path = tmp_path / "mixed.jsonl"
    lines = [b'{"text": "good one"}', b'{"text": "broken', b'{"body": "no text field"}', b"", b'{"text": null}',
             b'{"text": "bad \xff byte"}', b"[1, 2]", b'{"text": ""}', b'{"text": "good two"}']  # fmt: skip
    path.write_bytes(b"\n".join(lines) + b"\n")
    with pytest.raises(UserError, match=r"mixed\.jsonl:2: malformed JSON"):
        run(tmp_path, [str(path)], shard_tokens=2, val_shard_tokens=2)
    manifest, out = run(tmp_path, [str(path)], name="skip", shard_tokens=2, val_shard_tokens=2, skip_bad=True)
    _, tokens = read_output(out, 2, 2)
    np.testing.assert_array_equal(tokens, reference(["good one", "good two"]))
    assert (manifest["docs_read"], manifest["docs_skipped_bad"], manifest["docs_skipped_empty"]) == (8, 5, 1)


@pytest.mark.parametrize(
    "content, message",
    [
        (b'{"text": "ok"}\n{"text": "ok"\n', r"bad\.jsonl:2: malformed JSON"),
        (b'{"text": "ok"}\n\n{"title": "x"}\n', r"bad\.jsonl:3: no field 'text' \(fields: title\)"),
        (b'{"text": "ok"}\n{"text": "\xc3\x28"}\n', r"bad\.jsonl:2: invalid UTF-8 at byte 10"),
        (b'{"text": 5}\n', r"bad\.jsonl:1: 'text' is int, expected a string"),
        (b'"just a string"\n', r"bad\.jsonl:1: expected a JSON object, got str"),
    ],
)
def test_bad_jsonl_is_named_by_file_and_line(tmp_path, content, message):
    (tmp_path / "bad.jsonl").write_bytes(content)
    with pytest.raises(UserError, match=message + r".*--skip-bad"):
        run(tmp_path, [str(tmp_path / "bad.jsonl")], shard_tokens=1)


def test_bad_parquet_txt_and_paths(tmp_path):
    pq.write_table(pa.table({"text": ["fine", None]}), tmp_path / "nulls.parquet")
    with pytest.raises(UserError, match=r"nulls\.parquet: row 1: 'text' is null"):
        run(tmp_path, [str(tmp_path / "nulls.parquet")], name="nulls", shard_tokens=1)
    pq.write_table(pa.table({"content": ["x"]}), tmp_path / "cols.parquet")
    with pytest.raises(UserError, match=r"cols\.parquet has no column 'text' \(columns: content\)"):
        run(tmp_path, [str(tmp_path / "cols.parquet")], name="cols", shard_tokens=1)
    (tmp_path / "bad.txt").write_bytes(b"line one\nline \xff two\n")
    with pytest.raises(UserError, match=r"bad\.txt:2: invalid UTF-8 at byte 14"):
        run(tmp_path, [str(tmp_path / "bad.txt")], name="txt", shard_tokens=1)
    (tmp_path / "notes.csv").write_text("a,b\n")
    with pytest.raises(UserError, match=r"notes\.csv: unsupported input type"):
        run(tmp_path, [str(tmp_path / "notes.csv")])
    with pytest.raises(UserError, match=r"no input file matches .*\*\.jsonl"):
        run(tmp_path, [str(tmp_path / "none" / "*.jsonl")])
    (tmp_path / "tiny.txt").write_text("only a few tokens")
    with pytest.raises(UserError, match=r"only 5 tokens.*lower --val-shard-tokens"):
        run(tmp_path, [str(tmp_path / "tiny.txt")], name="tiny", val_shard_tokens=10)


@pytest.mark.slow
def test_cli_errors_are_one_line_with_exit_2(tmp_path):
    r = run_python(ROOT / "prepare_fineweb.py", "--input", tmp_path / "missing.jsonl", "--out", tmp_path / "o")
    assert r.returncode == 2 and r.stderr.strip() == f"error: no such input file: {tmp_path / 'missing.jsonl'}"
    # without --input the hub is needed: without network it fails at once, telling the user to pass --input
    start = time.monotonic()
    no_proxy = {v: "" for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")}
    env = {"HF_ENDPOINT": "http://127.0.0.1:9", "HF_HUB_OFFLINE": "0", "HF_DATASETS_OFFLINE": "0", **no_proxy}
    r = run_python(ROOT / "prepare_fineweb.py", "--out", tmp_path / "o", env=env)
    assert r.returncode == 2 and time.monotonic() - start < 30
    assert r.stderr.count("\n") == 1 and "cannot reach the Hugging Face hub" in r.stderr and "--input" in r.stderr


def test_hub_offline_mode_fails_at_once(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(UserError, match=r"hub is disabled \(HF_HUB_OFFLINE\); download .* pass them with --input"):
        run(tmp_path, [])


def test_refuses_a_directory_prepared_differently(tmp_path):
    inputs = write_input(tmp_path, "jsonl", DOCS)
    run(tmp_path, inputs)
    with pytest.raises(UserError, match=r"prepared with another shard_tokens \(300, now 200\).*--overwrite"):
        run(tmp_path, inputs, shard_tokens=200)
    other = tmp_path / "other.jsonl"
    other.write_text('{"text": "something else entirely"}\n')
    with pytest.raises(UserError, match=r"prepared with another source"):
        run(tmp_path, [str(other)])
    manifest, out = run(tmp_path, inputs, shard_tokens=200, val_shard_tokens=50, overwrite=True)
    _, tokens = read_output(out, 200, 50)
    np.testing.assert_array_equal(tokens, reference(DOCS))
    (out / "manifest.json").unlink()
    with pytest.raises(UserError, match=r"holds shards but no manifest\.json"):
        run(tmp_path, inputs, shard_tokens=200, val_shard_tokens=50)
    # a run that failed before its first shard is simply replaced: there is nothing to lose
    with pytest.raises(UserError, match="no field 'body'"):
        run(tmp_path, [str(other)], name="fresh", text_field="body")
    manifest, out = run(tmp_path, inputs, name="fresh")
    assert manifest["complete"] and manifest["source"]["text_field"] == "text"


def test_damaged_or_missing_shards_are_remade_identically(tmp_path):
    inputs = write_input(tmp_path, "parquet", DOCS * 3)
    _, out = run(tmp_path, inputs, shard_tokens=150, val_shard_tokens=100, batch_chars=300)
    original = {f.name: f.read_bytes() for f in out.iterdir()}
    manifest = json.loads(original["manifest.json"])
    mid_doc = [i for i, s in enumerate(manifest["shards"]) if i > 0 and s["start"]["offset"] > 0]
    damaged, deleted = out / manifest["shards"][mid_doc[0]]["file"], out / manifest["shards"][-2]["file"]
    damaged.write_bytes(damaged.read_bytes()[:-1] + b"\x00")
    deleted.unlink()
    (out / "train_000001.npy.tmp").write_bytes(b"left by a killed run")
    run(tmp_path, inputs, shard_tokens=150, val_shard_tokens=100, batch_chars=10**6)
    assert {f.name: f.read_bytes() for f in out.iterdir()} == original


@pytest.mark.parametrize("inside_document", [True, False])
def test_interrupted_before_complete_at_max_tokens(tmp_path, monkeypatch, inside_document):
    """Stopped after the last shard (cut by --max-tokens inside a document, or at the end of one followed by
    an empty one) but before the manifest said complete: the re-run completes it like an uninterrupted run."""
    import gpt2.prepare

    inputs = write_input(tmp_path, "jsonl", DOCS)
    first = len(reference(DOCS[:1]))
    kw = (
        dict(shard_tokens=150, val_shard_tokens=100, max_tokens=400)
        if inside_document
        else dict(shard_tokens=3, val_shard_tokens=first - 3, max_tokens=first)
    )
    _, whole = run(tmp_path, inputs, name="whole", **kw)
    finish = gpt2.prepare._ShardWriter.finish

    def interrupted(self, final):
        monkeypatch.setattr(gpt2.prepare._ShardWriter, "finish", finish)
        raise KeyboardInterrupt

    monkeypatch.setattr(gpt2.prepare._ShardWriter, "finish", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path, inputs, name="cut", **kw)
    manifest = json.loads((tmp_path / "cut" / "manifest.json").read_text())
    assert not manifest["complete"] and manifest["next"]["tokens"] == kw["max_tokens"]
    assert (manifest["next"]["offset"] > 0) == inside_document
    run(tmp_path, inputs, name="cut", **kw)
    assert {f.name: f.read_bytes() for f in (tmp_path / "cut").iterdir()} == {
        f.name: f.read_bytes() for f in whole.iterdir()
    }


def wait_for_shards(proc: subprocess.Popen, manifest: Path, count: int) -> None:
    while proc.poll() is None:
        try:
            if len(json.loads(manifest.read_text())["shards"]) >= count:
                return
        except (OSError, ValueError):
            pass
        time.sleep(0.005)
    raise AssertionError(f"prepare_fineweb.py ended before writing {count} shards: {proc.stderr.read()}")


@pytest.mark.slow
def test_kill_9_and_resume_is_byte_identical(tmp_path):
    """Kill the CLI (kill -9, 2 worker processes) twice mid-way; re-running finishes with the bytes of an
    uninterrupted run (with 1 worker)."""
    rng = np.random.default_rng(0)
    words = np.array("the of and a to in is you that it he was for on are as with his they I at be this".split())
    path = tmp_path / "docs.jsonl"
    with open(path, "w") as f:
        for _ in range(1200):
            f.write(json.dumps({"text": " ".join(rng.choice(words, rng.integers(1, 400)))}) + "\n")
    args = ["--input", path, "--shard-tokens", 1500, "--val-shard-tokens", 1000, "--batch-chars", 4000]
    r = run_python(ROOT / "prepare_fineweb.py", *args, "--workers", 1, "--out", tmp_path / "whole")
    assert r.returncode == 0, r.stderr
    command = [sys.executable, ROOT / "prepare_fineweb.py", *args, "--workers", 2, "--out", tmp_path / "killed"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    for shards in (3, 30):
        proc = subprocess.Popen(list(map(str, command)), env=env, stderr=subprocess.PIPE, text=True)
        wait_for_shards(proc, tmp_path / "killed" / "manifest.json", shards)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        assert not json.loads((tmp_path / "killed" / "manifest.json").read_text())["complete"]
    r = subprocess.run(list(map(str, command)), env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "resuming after" in r.stderr
    whole = {f.name: f.read_bytes() for f in (tmp_path / "whole").iterdir()}
    assert {f.name: f.read_bytes() for f in (tmp_path / "killed").iterdir()} == whole
    assert len(whole) > 100


@pytest.fixture
def local_hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> list[tuple]:
    """The hub code path (streaming IterableDataset, select_columns, skip on resume) fed from
    ``tmp_path/*.parquet``: ``datasets.load_dataset`` streams them with its parquet loader, as it streams the
    hub's parquet files. Returns the arguments of each ``load_dataset`` call."""
    import datasets

    import gpt2.prepare

    real_load = datasets.load_dataset
    calls = []

    def local_stream(path, name=None, split=None, streaming=False):
        calls.append((path, name, split, streaming))
        return real_load("parquet", data_files=sorted(map(str, tmp_path.glob("*.parquet"))), split=split,
                         streaming=True)  # fmt: skip

    monkeypatch.setattr(datasets, "load_dataset", local_stream)
    monkeypatch.setattr(gpt2.prepare, "_check_hub_reachable", lambda hint: None)
    return calls


def test_hub_source_streams_and_resumes(tmp_path, local_hub):
    write_input(tmp_path, "parquet", DOCS * 2)
    manifest, out = run(tmp_path, [], shard_tokens=200, val_shard_tokens=100, batch_chars=300)
    assert local_hub[0] == ("HuggingFaceFW/fineweb-edu", "sample-10BT", "train", True)
    assert manifest["source"] == {"kind": "hub", "dataset": "HuggingFaceFW/fineweb-edu", "name": "sample-10BT",
                                  "split": "train", "text_field": "text"}  # fmt: skip
    _, tokens = read_output(out, 200, 100)
    np.testing.assert_array_equal(tokens, reference(DOCS * 2))
    original = {f.name: f.read_bytes() for f in out.iterdir()}
    (out / manifest["shards"][-3]["file"]).unlink()
    run(tmp_path, [], shard_tokens=200, val_shard_tokens=100)
    assert {f.name: f.read_bytes() for f in out.iterdir()} == original


PID_LOG = "GPT2_TEST_PID_LOG"  # the file where tokenize_unit_noting_pid notes its process


def tokenize_unit_noting_pid(unit):
    """``tokenize_unit`` that also appends the id of the process running it to the file named by $GPT2_TEST_PID_LOG
    (slowed a little, so that every worker of the pool gets units)."""
    with open(os.environ[PID_LOG], "a") as f:
        f.write(f"{os.getpid()}\n")
    time.sleep(0.01)
    return tokenize_unit(unit)


@pytest.mark.parametrize("source", ["hub", "files"])
def test_workers_tokenize_in_that_many_processes_on_the_hub_path_as_on_files(tmp_path, monkeypatch, local_hub, source):
    """--workers 2: two worker processes (not this one) tokenize, --workers 1: this process alone, whether the input
    is streamed through ``datasets`` (the hub's path) or read from local files; both write the same bytes."""
    import gpt2.prepare

    # 2700 rows: ~10 units on the hub path, which reads 256 rows at a time
    pq.write_table(pa.table({"text": DOCS * 300}), tmp_path / "docs.parquet")
    monkeypatch.setattr(gpt2.prepare, "tokenize_unit", tokenize_unit_noting_pid)
    outputs = []
    for workers in (1, 2):
        monkeypatch.setenv(PID_LOG, str(tmp_path / f"pids_{workers}"))
        inputs = [str(tmp_path / "docs.parquet")] if source == "files" else []
        manifest, out = run(tmp_path, inputs, name=f"out_{workers}", workers=workers, shard_tokens=50_000,
                            val_shard_tokens=20_000, batch_chars=50_000)  # fmt: skip
        assert manifest["source"]["kind"] == source
        pids = list(map(int, (tmp_path / f"pids_{workers}").read_text().split()))
        assert len(pids) >= 10, "too few units to tell the workers apart"
        expected = {os.getpid()} if workers == 1 else set(pids) - {os.getpid()}
        assert set(pids) == expected and len(expected) == workers
        outputs.append({f.name: f.read_bytes() for f in out.iterdir() if f.name != "manifest.json"})
    assert outputs[0] == outputs[1] and len(outputs[0]) > 3
