"""Tokenize a text corpus (FineWeb-Edu by default) into the uint16 shards that ``gpt2.data`` reads.

Output, in one directory: ``val_000000.npy`` (the validation split, ``val_shard_tokens`` long), then
``train_000001.npy``, ``train_000002.npy``, ... (each exactly ``shard_tokens`` long but the last), every one
a 1-D uint16 array written with ``np.save``, plus ``manifest.json``. Every non-empty document becomes
``[EOT] + encode_ordinary(text)``; concatenating the shards in index order gives the documents in input order.

How it runs: the parent reads the input in order (a streamed Hugging Face dataset or local parquet/jsonl/txt
files) and hands units of about 1 MB (a list of texts, or raw jsonl lines that the worker parses) to
``workers`` processes; each returns one uint16 array and the kind of each record (document, empty, bad), and
the parent copies the arrays into a shard buffer. A full shard is written atomically in a background thread, then the
manifest is rewritten atomically with the shard's sha256 and the input position where the next shard starts
(documents read so far + tokens of the straddling document already written). A re-run of the same command
verifies the finished shards, skips the documents already consumed without tokenizing them, and continues:
the result is byte-identical to an uninterrupted run, whatever the batch size or the number of workers.
"""

from __future__ import annotations

import gzip
import importlib
import json
import logging
import multiprocessing as mp
import os
import signal
import socket
import zlib
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass
from glob import glob
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import numpy as np

from gpt2.cli import flag, option
from gpt2.errors import UserError
from gpt2.files import atomic_write, file_sha256
from gpt2.tokenizer import EOT_ID, RANKS_SHA256, get_encoding

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
FORMAT = "gpt2-shards/1"
SUFFIXES = (".parquet", ".jsonl", ".jsonl.gz", ".txt")
# These settings decide the bytes of the output: a directory prepared with other values is not resumed.
IDENTITY_KEYS = ("format", "source", "tokenizer", "tokenizer_sha256", "eot_id", "dtype", "shard_tokens",
                 "val_shard_tokens", "max_docs", "max_tokens")  # fmt: skip


def default_workers() -> int:
    """The cores this process may run on (its CPU affinity where the platform tells it, else all)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


SOURCE, OUTPUT, SPEED = "source (default: the Hugging Face dataset, streamed)", "output", "speed"


@dataclass
class PrepareConfig:
    """Everything that ``prepare`` needs; its fields are ``prepare_fineweb.py``'s flags (``gpt2.cli``)."""

    input: list[str] = option(
        default_factory=list, group=SOURCE, metavar="PATH",
        help="local files, globs or directories instead of the hub: .parquet, .jsonl, .jsonl.gz, or .txt (one "
        "document per file); read in the order given, globs and directories sorted by name",
    )  # fmt: skip
    dataset: str = option("HuggingFaceFW/fineweb-edu", "hub dataset", group=SOURCE)
    name: str | None = option("sample-10BT", "hub dataset config; '' for none", group=SOURCE)
    split: str = option("train", "hub dataset split", group=SOURCE)
    text_field: str = option("text", "column or JSON field holding the document", group=SOURCE)
    max_docs: int | None = option(None, "stop after this many documents (default: all)", group=SOURCE)
    max_tokens: int | None = option(None, "stop after exactly this many tokens (default: all)", group=SOURCE)
    skip_bad: bool = option(
        False, "skip and count malformed documents (bad JSON, missing/null text, invalid UTF-8) instead of "
        "stopping at the first one", group=SOURCE,
    )  # fmt: skip
    out: Path = option(Path("data/fineweb_edu10B"), "output directory", group=OUTPUT)
    shard_tokens: int = option(100_000_000, "tokens per shard; the last one is shorter", group=OUTPUT)
    val_shard_tokens: int | None = option(
        None, "tokens of the validation shard 0 (default: --shard-tokens)", aliases=["--val-tokens"], group=OUTPUT
    )
    overwrite: bool = option(
        False, "replace the shards and manifest in --out, even from another source or settings", group=OUTPUT
    )
    workers: int = option(
        default_factory=default_workers, help="tokenizer processes (default: the cores this process may use)",
        group=SPEED,
    )  # fmt: skip
    batch_chars: int = option(1 << 20, "characters (jsonl: bytes) of text per unit of work", group=SPEED)

    def __post_init__(self) -> None:
        self.out = Path(self.out)
        self.name = self.name or None
        if self.val_shard_tokens is None:
            self.val_shard_tokens = self.shard_tokens
        for name in ("shard_tokens", "val_shard_tokens", "workers", "batch_chars", "max_docs", "max_tokens"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise UserError(f"{flag(name)} must be at least 1, got {value}")


@dataclass(frozen=True)
class Position:
    """A point in the token stream, as a place to resume from.

    ``docs_read`` input records (documents, including skipped ones) lie wholly before it, then ``offset``
    tokens of the next record's ``[EOT] + tokens``; the skip counts and ``tokens`` cover everything before it.
    """

    docs_read: int = 0
    offset: int = 0
    docs_skipped_empty: int = 0
    docs_skipped_bad: int = 0
    tokens: int = 0

    def through_document(self) -> Position:
        """The same point with the document it cuts counted as read: the final counts when --max-tokens cut it."""
        if not self.offset:
            return self
        return Position(self.docs_read + 1, 0, self.docs_skipped_empty, self.docs_skipped_bad, self.tokens)


@dataclass(frozen=True)
class BadRecord:
    """An input record that cannot be a document; ``where`` names its file and line or row."""

    where: str
    why: str


Record = str | BadRecord


class _Bad(Exception):
    """Why a record cannot be a document; the caller knows where it is."""


@dataclass(frozen=True)
class JsonLines:
    """Whole lines of a jsonl file, parsed in a worker: the parent only cuts the file at line ends."""

    path: str
    first_line: int  # the line number of the first line of ``data``
    data: bytes
    text_field: str


@dataclass(frozen=True)
class ArrowRows:
    """A slice of a text column (parquet file or hub stream), turned into Python strings in a worker."""

    where: str  # the file or dataset, for error messages
    first_row: int
    values: Any  # a pyarrow string or binary array
    text_field: str


Unit = list[Record] | JsonLines | ArrowRows  # the work handed to a worker at a time
ROWS_PER_READ = 256  # rows per arrow batch read; batches are joined into units of about batch_chars


@dataclass(frozen=True)
class Progress:
    """Reported after every batch: tokens written so far and the fraction of the job done (None: unknown)."""

    tokens: int
    fraction: float | None


# ----------------------------------------------------------------------------------------------------------
# Sources: an ordered stream of records, restartable at any record index.


class FileSource:
    """Local files: ``.parquet`` (the text column, in arrow batches), ``.jsonl``/``.jsonl.gz`` (a JSON object
    per line; blank lines are ignored), ``.txt`` (the whole file is one document). Rows are numbered from 0,
    lines from 1."""

    def __init__(self, patterns: list[str], text_field: str) -> None:
        self.paths = expand_inputs(patterns)
        self.text_field = text_field
        self.sizes = [p.stat().st_size for p in self.paths]
        for path in self.paths:  # a missing column is found now, not hours later
            if _kind(path) == "parquet":
                _open_parquet(path, text_field)
        self._index = 0  # the file being read
        self._bytes_done = 0  # bytes of the files before it
        self._file_fraction = 0.0  # how far into the current file

    @property
    def identity(self) -> dict[str, Any]:
        files = [{"path": str(p), "bytes": n} for p, n in zip(self.paths, self.sizes)]
        return {"kind": "files", "files": files, "text_field": self.text_field}

    def progress(self) -> float | None:
        total = sum(self.sizes)
        return (self._bytes_done + self._file_fraction * self.sizes[self._index]) / total if total else None

    def units(self, start: int, batch_chars: int) -> Iterator[Unit]:
        """The records from record index ``start`` on, in units of about ``batch_chars`` characters."""
        return _grouped(self._items(start, batch_chars), batch_chars)

    def _items(self, start: int, batch_chars: int) -> Iterator[Record | JsonLines | ArrowRows]:
        skip = start  # records before ``start`` are skipped, not parsed: whole files by their record count
        for index, path in enumerate(self.paths):
            self._index = index
            kind = _kind(path)
            self._file_fraction = 0.0
            if skip:
                n = _count_records(path, kind, self.text_field)
                if skip >= n:
                    skip -= n
                    self._bytes_done += self.sizes[self._index]
                    continue
            if kind == "jsonl":
                yield from self._jsonl(path, skip, batch_chars)
            else:
                yield from (self._parquet(path, skip, batch_chars) if kind == "parquet" else self._txt(path, skip))
            skip = 0
            self._bytes_done += self.sizes[self._index]

    def _jsonl(self, path: Path, skip: int, batch_chars: int) -> Iterator[JsonLines]:
        with open(path, "rb") as raw:
            f = gzip.GzipFile(fileobj=raw) if path.name.endswith(".gz") else raw
            size = max(self.sizes[self._index], 1)
            lineno = 1
            try:
                while skip and (line := f.readline()):  # resuming: skip records (non-blank lines) one by one
                    lineno += 1
                    skip -= not line.isspace()
                while data := f.read(batch_chars):
                    data += f.readline()  # cut at a line end
                    yield JsonLines(str(path), lineno, data, self.text_field)
                    lineno += data.count(b"\n")
                    self._file_fraction = raw.tell() / size
            except (OSError, EOFError, zlib.error) as e:
                raise UserError(f"{path}: cannot read ({e})") from e

    def _parquet(self, path: Path, skip: int, batch_chars: int) -> Iterator[ArrowRows]:
        pf = _open_parquet(path, self.text_field)
        group, row = 0, 0
        while skip and skip >= pf.metadata.row_group(group).num_rows:  # whole row groups are skipped unread
            n = pf.metadata.row_group(group).num_rows
            skip, row, group = skip - n, row + n, group + 1
        groups = range(group, pf.num_row_groups)
        batches = pf.iter_batches(batch_size=ROWS_PER_READ, columns=[self.text_field], row_groups=groups)
        columns = (batch.column(0) for batch in batches)
        for unit in _arrow_units(columns, str(path), row, skip, batch_chars, self.text_field):
            yield unit
            self._file_fraction = (unit.first_row + len(unit.values)) / max(pf.metadata.num_rows, 1)

    def _txt(self, path: Path, skip: int) -> Iterator[Record]:
        assert skip == 0, "_items() skips whole .txt files"
        data = path.read_bytes()
        try:
            yield data.decode("utf-8")
        except UnicodeDecodeError as e:
            line = data.count(b"\n", 0, e.start) + 1
            yield BadRecord(f"{path}:{line}", f"invalid UTF-8 at byte {e.start}")


class HubSource:
    """A Hugging Face dataset, streamed (no local arrow cache); needs the network."""

    def __init__(self, dataset: str, name: str | None, split: str, text_field: str) -> None:
        self.dataset, self.name, self.split, self.text_field = dataset, name, split, text_field
        self._read = 0
        self._total: int | None = None

    @property
    def identity(self) -> dict[str, Any]:
        return {"kind": "hub", "dataset": self.dataset, "name": self.name, "split": self.split,
                "text_field": self.text_field}  # fmt: skip

    def progress(self) -> float | None:
        return self._read / self._total if self._total else None

    def units(self, start: int, batch_chars: int) -> Iterator[Unit]:
        """The records from record index ``start`` on, in units of about ``batch_chars`` characters."""
        return self._units(start, batch_chars)

    def _units(self, start: int, batch_chars: int) -> Iterator[ArrowRows]:
        stream = self._open().select_columns([self.text_field]).skip(start).with_format("arrow")
        self._read = start
        columns = (table.column(self.text_field).combine_chunks() for table in stream.iter(ROWS_PER_READ))
        try:
            for unit in _arrow_units(columns, self.dataset, start, 0, batch_chars, self.text_field):
                self._read = unit.first_row + len(unit.values)
                yield unit
        except _network_errors() as e:
            raise UserError(f"lost the stream of {self.dataset} ({e}); re-run the same command to resume") from e

    def _open(self):
        hint = "download its parquet files and pass them with --input"
        _check_hub_reachable(hint)
        import datasets

        try:
            stream = datasets.load_dataset(self.dataset, name=self.name, split=self.split, streaming=True)
        except (*_network_errors(), ValueError) as e:
            raise UserError(
                f"cannot stream {self.dataset} ({self.name}, {self.split}) from the hub: {e}; {hint}"
            ) from e
        if self.text_field not in (stream.column_names or [self.text_field]):
            raise UserError(f"{self.dataset} has no column {self.text_field!r} (columns: {stream.column_names})")
        splits = stream.info.splits
        self._total = splits[self.split].num_examples if splits and self.split in splits else None
        return stream


def _network_errors() -> tuple[type[Exception], ...]:
    """What the hub client raises when the network fails: OSError, and the HTTP library's own errors."""
    errors: list[type[Exception]] = [OSError]
    for module in ("httpx2", "httpx"):  # huggingface_hub's HTTP client, by version; not an OSError
        try:
            errors.append(importlib.import_module(module).HTTPError)
        except ImportError:
            pass
    return tuple(errors)


def _check_hub_reachable(hint: str) -> None:
    """Fail in seconds, not after minutes of retries, when the hub cannot be reached."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE or os.environ.get("HF_DATASETS_OFFLINE", "0") not in ("", "0"):
        raise UserError(f"the Hugging Face hub is disabled (HF_HUB_OFFLINE); {hint}")
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return  # the hub is reached through a proxy: leave the check to the client
    url = urlparse(constants.ENDPOINT)
    try:
        socket.create_connection((url.hostname, url.port or 443), timeout=10).close()
    except OSError as e:
        raise UserError(f"cannot reach the Hugging Face hub at {constants.ENDPOINT} ({e}); {hint}") from e


def expand_inputs(patterns: list[str]) -> list[Path]:
    """Files named by ``patterns`` (files, globs, directories of input files), in order, each once."""
    paths: list[Path] = []
    seen: set[Path] = set()
    for pattern in patterns:
        path = Path(pattern)
        if path.is_dir():
            found = sorted(p for p in path.iterdir() if p.is_file() and p.name.endswith(SUFFIXES))
            if not found:
                raise UserError(f"{path} holds no input files ({', '.join(SUFFIXES)})")
        elif path.is_file():
            found = [path]
        elif any(c in pattern for c in "*?["):
            found = sorted(Path(p) for p in glob(pattern) if Path(p).is_file())
            if not found:
                raise UserError(f"no input file matches {pattern}")
        else:
            raise UserError(f"no such input file: {pattern}")
        for p in map(Path.resolve, found):
            _kind(p)
            if p not in seen:
                seen.add(p)
                paths.append(p)
    return paths


def _kind(path: Path) -> str:
    name = path.name
    if name.endswith(".parquet"):
        return "parquet"
    if name.endswith((".jsonl", ".jsonl.gz")):
        return "jsonl"
    if name.endswith(".txt"):
        return "txt"
    raise UserError(f"{path}: unsupported input type (expected {', '.join(SUFFIXES)})")


def _count_records(path: Path, kind: str, text_field: str) -> int:
    if kind == "parquet":
        return _open_parquet(path, text_field).metadata.num_rows
    if kind == "txt":
        return 1
    opener = gzip.open if path.name.endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            return sum(1 for line in f if not line.isspace())
    except (OSError, EOFError, zlib.error) as e:
        raise UserError(f"{path}: cannot read ({e})") from e


def _open_parquet(path: Path, text_field: str):
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as e:
        raise UserError(f"{path}: not a readable parquet file ({e})") from e
    names = pf.schema_arrow.names
    if text_field not in names:
        raise UserError(
            f"{path} has no column {text_field!r} (columns: {', '.join(names)}); choose one with --text-field"
        )
    return pf


def _json_text(line: bytes, text_field: str) -> str:
    """The text of one jsonl line; ``_Bad`` says why there is none."""
    try:
        obj = json.loads(line.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise _Bad(f"invalid UTF-8 at byte {e.start} of the line") from None
    except json.JSONDecodeError as e:
        raise _Bad(f"malformed JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(obj, dict):
        raise _Bad(f"expected a JSON object, got {type(obj).__name__}")
    if text_field not in obj:
        raise _Bad(f"no field {text_field!r} (fields: {', '.join(obj)}); choose one with --text-field")
    return _text(obj[text_field], text_field)


def _text(value: object, text_field: str) -> str:
    """A column or field value as text: a string, or UTF-8 bytes."""
    if isinstance(value, str):
        return value
    if isinstance(value, bytes):
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError as e:
            raise _Bad(f"invalid UTF-8 at byte {e.start} of {text_field!r}") from None
    kind = "null" if value is None else type(value).__name__
    raise _Bad(f"{text_field!r} is {kind}, expected a string")


def _arrow_units(
    columns: Iterator[Any], where: str, first_row: int, skip: int, batch_chars: int, text_field: str
) -> Iterator[ArrowRows]:
    """Arrow column batches joined into units of about ``batch_chars`` bytes, after skipping ``skip`` rows."""
    import pyarrow as pa

    parts, size, row = [], 0, first_row + skip
    for column in columns:
        drop = min(skip, len(column))
        skip -= drop
        parts.append(column.slice(drop))
        size += parts[-1].nbytes
        if size >= batch_chars:
            yield ArrowRows(where, row, pa.concat_arrays(parts), text_field)
            row += sum(map(len, parts))
            parts, size = [], 0
    if parts:
        yield ArrowRows(where, row, pa.concat_arrays(parts), text_field)


def _grouped(items: Iterator[Record | JsonLines | ArrowRows], batch_chars: int) -> Iterator[Unit]:
    """Records gathered into lists of about ``batch_chars`` characters; ready units pass through as they are."""
    group: list[Record] = []
    chars = 0
    for item in items:
        if isinstance(item, JsonLines | ArrowRows):
            if group:
                yield group
                group, chars = [], 0
            yield item
            continue
        group.append(item)
        chars += len(item) if isinstance(item, str) else 0
        if chars >= batch_chars:
            yield group
            group, chars = [], 0
    if group:
        yield group


# ----------------------------------------------------------------------------------------------------------
# Tokenization: units of records, in order, parsed and tokenized in worker processes.


DOC, EMPTY, BAD = 0, 1, 2  # what each record of a unit turned out to be


def tokenize_unit(unit: Unit) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[BadRecord]]:
    """A worker's job: parse a unit's records, then tokenize its documents (``tokenize_documents``).

    Returns the tokens, each document's length, each record's kind (DOC, EMPTY or BAD) and the bad records.
    """
    records = _records_of(unit)
    kinds = np.array([BAD if isinstance(r, BadRecord) else EMPTY if not r or r.isspace() else DOC for r in records],
                     dtype=np.int8)  # fmt: skip
    tokens, lengths = tokenize_documents([r for r, kind in zip(records, kinds) if kind == DOC])
    return tokens, lengths, kinds, [r for r in records if isinstance(r, BadRecord)]


def _records_of(unit: Unit) -> list[Record]:
    if isinstance(unit, JsonLines):
        lines, where = unit.data.split(b"\n"), f"{unit.path}:{{}}"
        return [
            _record(_json_text, line, unit.text_field, where, unit.first_line + i)
            for i, line in enumerate(lines)
            if line and not line.isspace()  # blank lines are not records
        ]
    if isinstance(unit, ArrowRows):
        values, where = unit.values.to_pylist(), f"{unit.where}: row {{}}"
        return [_record(_text, value, unit.text_field, where, unit.first_row + i) for i, value in enumerate(values)]
    return unit


def _record(parse: Callable[[Any, str], str], value: Any, text_field: str, where: str, number: int) -> Record:
    """``parse(value)``, or a ``BadRecord`` saying where (``where`` filled with the line or row) and why not."""
    try:
        return parse(value, text_field)
    except _Bad as e:
        return BadRecord(where.format(number), str(e))


def tokenize_documents(texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """``[EOT] + encode_ordinary(text)`` for each text, concatenated as uint16, and each document's length."""
    enc = get_encoding()
    pieces = [np.frombuffer(_encode_ordinary_buffer(enc, text), dtype=np.uint32) for text in texts]
    assert all(p.max(initial=0) < 2**16 for p in pieces), "token ids must fit in uint16"
    lengths = np.fromiter((len(p) + 1 for p in pieces), dtype=np.int64, count=len(pieces))
    tokens = np.empty(int(lengths.sum()), dtype=np.uint16)
    pos = 0
    for piece in pieces:
        tokens[pos] = EOT_ID
        tokens[pos + 1 : pos + 1 + len(piece)] = piece
        pos += len(piece) + 1
    return tokens, lengths


def _encode_ordinary_buffer(enc, text: str):
    """tiktoken's ``encode_ordinary`` into a uint32 buffer, skipping the Python list of ints.

    With no special tokens allowed, ``encode_to_tiktoken_buffer`` encodes exactly like ``encode_ordinary``
    (a literal ``<|endoftext|>`` stays text); lone surrogates are replaced as ``encode_ordinary`` does.
    """
    try:
        return enc._core_bpe.encode_to_tiktoken_buffer(text, set())
    except UnicodeEncodeError:
        text = text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
        return enc._core_bpe.encode_to_tiktoken_buffer(text, set())


def _ignore_sigint() -> None:
    """Workers leave Ctrl-C to the parent, which stops them: one message instead of one traceback each."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _tokenized(units: Iterator[Unit], workers: int) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray, list]]:
    """``tokenize_unit`` of each unit, in input order; at most 2 units per worker in flight."""
    get_encoding()  # built once here: forked workers inherit it
    if workers == 1:
        yield from map(tokenize_unit, units)
        return
    # fork where the platform has it: workers start at once and share the parent's imports and encoding.
    method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
    with mp.get_context(method).Pool(workers, initializer=_ignore_sigint) as pool:
        pending: deque[Any] = deque()
        for unit in units:
            pending.append(pool.apply_async(tokenize_unit, (unit,)))
            if len(pending) >= 2 * workers:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()


# ----------------------------------------------------------------------------------------------------------
# Output: shards and the manifest, each written atomically.


def shard_name(index: int) -> str:
    """Shard 0 is the validation split; the training shards follow from 1."""
    return f"{'val' if index == 0 else 'train'}_{index:06d}.npy"


def _write_manifest(out: Path, manifest: dict[str, Any]) -> None:
    atomic_write(out / MANIFEST, lambda f: f.write((json.dumps(manifest, indent=1) + "\n").encode()))


def _is_output_file(name: str) -> bool:
    base = name.removesuffix(".tmp")
    return base == MANIFEST or (base.startswith(("val_", "train_")) and base.endswith(".npy"))


def _new_manifest(cfg: PrepareConfig, source: FileSource | HubSource) -> dict[str, Any]:
    settings = {"format": FORMAT, "source": source.identity, "tokenizer": "gpt2", "tokenizer_sha256": RANKS_SHA256,
                "eot_id": EOT_ID, "dtype": "uint16", "shard_tokens": cfg.shard_tokens,
                "val_shard_tokens": cfg.val_shard_tokens,
                "max_docs": cfg.max_docs, "max_tokens": cfg.max_tokens, "skip_bad": cfg.skip_bad}  # fmt: skip
    return {**settings, "complete": False, **_counts(Position()), "shards": [], "next": asdict(Position())}


def _counts(pos: Position) -> dict[str, int]:
    return {"tokens": pos.tokens, "docs_read": pos.docs_read, "docs_skipped_empty": pos.docs_skipped_empty,
            "docs_skipped_bad": pos.docs_skipped_bad}  # fmt: skip


def _open_output(cfg: PrepareConfig, source: FileSource | HubSource) -> tuple[dict[str, Any], Position]:
    """The manifest to continue and where to resume; refuses a directory prepared differently."""
    out = cfg.out
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file, not a directory")
    out.mkdir(parents=True, exist_ok=True)
    fresh = _new_manifest(cfg, source)
    ours = [p for p in out.iterdir() if _is_output_file(p.name)]
    if cfg.overwrite:
        for p in ours:
            p.unlink()
    elif (out / MANIFEST).exists():
        manifest = _read_manifest(out / MANIFEST)
        for key in IDENTITY_KEYS:
            if manifest.get(key) != fresh[key] and manifest["shards"]:  # with no shard yet, nothing is lost
                raise UserError(
                    f"{out} was prepared with another {key} ({json.dumps(manifest.get(key))[:300]}, now "
                    f"{json.dumps(fresh[key])[:300]}); pass --overwrite to replace it, or choose another --out"
                )
        for p in ours:
            if p.name.endswith(".tmp"):
                p.unlink()  # left by a killed run
        if manifest["shards"]:
            manifest["skip_bad"] = cfg.skip_bad  # not in the identity: both write the same bytes up to a bad record
            return _verify_shards(out, manifest)
    elif ours:
        raise UserError(f"{out} holds shards but no {MANIFEST}; pass --overwrite to replace them")
    _write_manifest(out, fresh)
    return fresh, Position()


def _read_manifest(path: Path) -> dict[str, Any]:
    try:
        manifest = json.loads(path.read_text())
        if manifest.get("format") == FORMAT:
            if "val_tokens" in manifest:  # written before v0.2, which renamed the setting
                manifest["val_shard_tokens"] = manifest.pop("val_tokens")
            return manifest
    except (ValueError, AttributeError):
        pass
    raise UserError(f"{path} is not a manifest written by prepare_fineweb.py; pass --overwrite to replace it")


def _verify_shards(out: Path, manifest: dict[str, Any]) -> tuple[dict[str, Any], Position]:
    """Check every finished shard's sha256; resume from the first one that is missing or damaged."""
    if manifest["shards"]:
        log.info("checking the sha256 of %d finished shards in %s", len(manifest["shards"]), out)
    for i, shard in enumerate(manifest["shards"]):
        path = out / shard_name(i)
        if shard["file"] != path.name or not path.is_file() or file_sha256(path) != shard["sha256"]:
            log.warning("%s is missing or does not match its sha256: making it again", path)
            start = Position(**shard["start"])
            manifest.update(complete=False, shards=manifest["shards"][:i], next=asdict(start), **_counts(start))
            _write_manifest(out, manifest)
            return manifest, start
    return manifest, Position(**manifest["next"])


@dataclass
class _Batch:
    """One unit's place in the input: the record index of each document and of each bad record, and counts."""

    records: list[int]
    bad_records: list[int]
    docs_read: int  # records read up to the end of this batch
    docs_before: int  # documents tokenized before this batch
    bad_before: int  # bad records skipped before this batch

    @property
    def docs_after(self) -> int:
        return self.docs_before + len(self.records)

    @property
    def skipped_bad(self) -> int:
        return self.bad_before + len(self.bad_records)


def _position(batch: _Batch, lengths: np.ndarray, ends: np.ndarray, taken: int, tokens: int) -> Position:
    """Where the stream stands once the first ``taken`` tokens of ``batch`` are written (``tokens`` in all)."""
    j = int(np.searchsorted(ends, taken - 1, side="right"))  # the document holding the last token taken
    record, docs, offset = batch.records[j], batch.docs_before + j, taken - int(ends[j] - lengths[j])
    if offset == lengths[j]:
        record, docs, offset = record + 1, docs + 1, 0
    bad = batch.bad_before + sum(r < record for r in batch.bad_records)
    return Position(record, offset, record - docs - bad, bad, tokens)


class _ShardWriter:
    """Copies token arrays into the current shard's buffer; a background thread writes full shards + manifest."""

    def __init__(self, cfg: PrepareConfig, manifest: dict[str, Any], start: Position) -> None:
        self.cfg, self.manifest = cfg, manifest
        self.index = len(manifest["shards"])
        self.shard_start = start
        self.tokens = start.tokens
        self.drop = start.offset  # tokens of the first document already in an earlier shard
        self.buf = np.empty(self._capacity(), dtype=np.uint16)
        self.fill = 0
        self.thread = ThreadPoolExecutor(1, thread_name_prefix="shard-writer")
        self.pending: Future | None = None

    def _capacity(self) -> int:
        return self.cfg.val_shard_tokens if self.index == 0 else self.cfg.shard_tokens

    def add(self, batch: _Batch, tokens: np.ndarray, lengths: np.ndarray) -> Position | None:
        """Copy a batch in; once --max-tokens is reached, the final position (the rest of the batch is dropped)."""
        ends = np.cumsum(lengths)
        taken, self.drop = self.drop, 0
        while taken < len(tokens):
            n = min(len(self.buf) - self.fill, len(tokens) - taken)
            if self.cfg.max_tokens is not None:
                n = min(n, self.cfg.max_tokens - self.tokens)
            self.buf[self.fill : self.fill + n] = tokens[taken : taken + n]
            self.fill, self.tokens, taken = self.fill + n, self.tokens + n, taken + n
            if self.fill == len(self.buf):
                self._flush(_position(batch, lengths, ends, taken, self.tokens))
            if self.tokens == self.cfg.max_tokens:
                return _position(batch, lengths, ends, taken, self.tokens).through_document()
        return None

    def finish(self, final: Position) -> None:
        """Write the last, shorter shard and mark the manifest complete with the final counts."""
        if self.fill and self.index > 0:
            self._flush(final)
        self._wait()
        if self.index < 2:
            raise UserError(
                f"the input holds only {self.tokens:,} tokens, no more than --val-shard-tokens "
                f"{self.cfg.val_shard_tokens:,}: nothing is left for a training shard; lower --val-shard-tokens"
            )
        self.manifest.update(complete=True, next=asdict(final), **_counts(final))
        _write_manifest(self.cfg.out, self.manifest)

    def close(self) -> None:
        self.thread.shutdown(wait=True)  # a shard being written is finished, so its work is not lost

    def _flush(self, next_start: Position) -> None:
        self._wait()
        entry = {"file": shard_name(self.index), "split": "val" if self.index == 0 else "train", "tokens": self.fill}
        self.pending = self.thread.submit(self._write, self.buf[: self.fill], entry, self.shard_start, next_start)
        self.index, self.shard_start = self.index + 1, next_start
        self.buf, self.fill = np.empty(self._capacity(), dtype=np.uint16), 0

    def _write(self, tokens: np.ndarray, entry: dict[str, Any], start: Position, next_start: Position) -> None:
        path = self.cfg.out / entry["file"]
        atomic_write(path, lambda f: np.save(f, tokens))
        entry.update(sha256=file_sha256(path), start=asdict(start))
        self.manifest["shards"].append(entry)
        self.manifest.update(next=asdict(next_start), **_counts(next_start))
        _write_manifest(self.cfg.out, self.manifest)

    def _wait(self) -> None:
        if self.pending is not None:
            try:
                self.pending.result()
            except OSError as e:
                raise UserError(f"cannot write to {self.cfg.out}: {e}") from e
            self.pending = None


# ----------------------------------------------------------------------------------------------------------


def prepare(cfg: PrepareConfig, on_progress: Callable[[Progress], None] | None = None) -> dict[str, Any]:
    """Prepare the shards in ``cfg.out``, or finish a run that was interrupted; returns the final manifest."""
    source = (
        FileSource(cfg.input, cfg.text_field)
        if cfg.input
        else HubSource(cfg.dataset, cfg.name, cfg.split, cfg.text_field)
    )
    manifest, start = _open_output(cfg, source)
    if manifest["complete"]:
        log.info("%s is already complete: %d shards, %d tokens", cfg.out, len(manifest["shards"]), manifest["tokens"])
        return manifest
    if manifest["shards"]:
        log.info("resuming after %d finished shards, at input document %d", len(manifest["shards"]), start.docs_read)
    writer = _ShardWriter(cfg, manifest, start)
    try:
        writer.finish(_tokenize_into(writer, source, start, cfg, on_progress))
    finally:
        writer.close()
    return manifest


def _tokenize_into(
    writer: _ShardWriter,
    source: FileSource | HubSource,
    start: Position,
    cfg: PrepareConfig,
    on_progress: Callable[[Progress], None] | None,
) -> Position:
    """Tokenize the input from ``start`` into ``writer``; returns the final position (the counts of the run)."""
    if start.tokens == cfg.max_tokens:  # killed after the last shard, before the manifest said complete
        return start.through_document()
    batch = _Batch([], [], start.docs_read, start.docs_read - start.docs_skipped_empty - start.docs_skipped_bad,
                   start.docs_skipped_bad)  # fmt: skip
    stream = _tokenized(source.units(start.docs_read, cfg.batch_chars), cfg.workers)
    try:
        for tokens, lengths, kinds, bad in stream:
            if bad and not cfg.skip_bad:
                raise UserError(f"{bad[0].where}: {bad[0].why} (--skip-bad skips such documents)")
            docs = np.flatnonzero(kinds == DOC)
            last_unit = cfg.max_docs is not None and batch.docs_after + len(docs) >= cfg.max_docs
            if last_unit:  # keep the records up to the last document allowed
                docs = docs[: cfg.max_docs - batch.docs_after]
                kinds = kinds[: docs[-1] + 1 if len(docs) else 0]
                lengths = lengths[: len(docs)]
                tokens = tokens[: lengths.sum()]
            first = batch.docs_read
            batch = _Batch((first + docs).tolist(), (first + np.flatnonzero(kinds == BAD)).tolist(),
                           first + len(kinds), batch.docs_after, batch.skipped_bad)  # fmt: skip
            final = writer.add(batch, tokens, lengths)
            if final is not None:
                return final
            if on_progress is not None:
                fraction = _fraction(cfg, writer.tokens, batch.docs_after, source.progress())
                on_progress(Progress(writer.tokens, fraction))
            if last_unit:
                break
    finally:
        stream.close()  # stops the workers at once where --max-tokens or --max-docs cut the input short
    # the input ran out (or --max-docs): every record read counts
    skipped_empty = batch.docs_read - batch.docs_after - batch.skipped_bad
    return Position(batch.docs_read, 0, skipped_empty, batch.skipped_bad, writer.tokens)


def _fraction(cfg: PrepareConfig, tokens: int, docs: int, source_fraction: float | None) -> float | None:
    """The largest of the fractions known: of --max-tokens, of --max-docs, of the input read."""
    known = [source_fraction]
    if cfg.max_tokens:
        known.append(tokens / cfg.max_tokens)
    if cfg.max_docs:
        known.append(docs / cfg.max_docs)
    return max((f for f in known if f is not None), default=None)
