"""Experiment tracking: mirror the records of ``log.jsonl`` into TensorBoard and Weights & Biases (rank 0 only).

``log.jsonl`` stays the source of truth; trackers are views of it that never stop a run. Naming: every numeric
field of a record becomes the scalar ``<kind>/<field>`` at the record's step (``train/loss``, ``train/lr``,
``val/loss``, ``hellaswag/acc_norm``, ...; None values are skipped); a ``task`` field names a sub-series
(``{"kind": "downstream", "task": "arc_easy", "acc": ...}`` -> ``downstream/arc_easy/acc``); text fields (the
``sample`` record's list of strings) are logged as text (``sample/text``, which TensorBoard shows as
``sample/text/text_summary``: ``SummaryWriter.add_text`` adds that suffix).

Where: TensorBoard event files go to ``<out>/tb`` (or ``--tensorboard DIR``), W&B's files to ``<out>/wandb``, and
``<out>/tracking.json`` remembers both (the W&B run id, so a resumed run continues the same W&B run).

Resuming from a checkpoint at step S (``log.jsonl`` then keeps the train records of steps < S and the
evaluation records of steps <= S):

- **TensorBoard** ends up exactly like ``log.jsonl``. Each launch writes its own event file through
  ``SummaryWriter(purge_step=S)``, which starts it with a session start event at S; reading it, TensorBoard drops
  what the earlier files hold at steps >= S, and the kept evaluation records of step S are written again.
  (TensorBoard's default Rust loader instead drops a tag's points at steps >= s when a point at step s arrives,
  which gives the same curves once the resumed run has logged each tag again.)
- **W&B** history only grows (rewriting it needs W&B's server-side "rewind", a preview feature), so W&B keeps
  the first value logged for each record: a record an earlier attempt already sent (it was in ``log.jsonl``
  before truncation) is not sent again. Every record is its own history row with a ``step`` field, the x-axis
  of every chart (W&B's own ``_step`` just counts rows), so rows need not arrive in step order. A resumed
  offline run writes a new segment with the same run id under ``<out>/wandb``; each record is in exactly one
  segment, and ``wandb sync <out>/wandb`` uploads a run's segments in order of their start.

A backend that was not used before (``--tensorboard`` or ``--wandb`` first given when resuming) is first sent
the history kept in ``log.jsonl``. A backend that raises is reported once through ``warn`` and turned off.
"""

from __future__ import annotations

import importlib
import json
import logging
import secrets
import time
from collections.abc import Callable, Iterable, Sequence
from html import escape
from numbers import Real
from pathlib import Path
from typing import IO, Any, Protocol

from gpt2.errors import UserError
from gpt2.rundir import read_tracking, write_tracking

log = logging.getLogger(__name__)

INSTALL_HINT = 'pip install -e ".[track]"'
NAME_FIELDS = ("task",)  # string fields that name a sub-series instead of being logged as text
WANDB_INIT_TIMEOUT_S = 30.0  # then fall back to an offline W&B run
WANDB_LOCK = ".trainer.lock"  # in <out>/wandb: held by a training run while it writes its W&B run
TRAINER_LOCK_WAIT_S = 60.0  # how long a trainer waits for an evaluator to finish writing into its W&B run

Warn = Callable[[str], None]


class Tracker(Protocol):
    """What the trainer (rank 0) and the evaluator talk to: one or several backends behind one object."""

    def log_config(self, config: dict[str, Any]) -> None: ...

    def log_record(self, rec: dict[str, Any]) -> None: ...

    def close(self, exit_code: int = 0) -> None: ...


# ----------------------------------------------------------------------------------------------------------------------
# Records


def series(rec: dict[str, Any], prefix: str = "") -> str:
    """The name prefix of a record's values: ``train``, ``downstream/arc_easy``, ``eval/hellaswag``, ..."""
    parts = [prefix] if prefix else []
    parts.append(rec["kind"])
    parts += [rec[f] for f in NAME_FIELDS if isinstance(rec.get(f), str)]
    return "/".join(parts)


def record_values(rec: dict[str, Any], prefix: str = "") -> tuple[dict[str, float], dict[str, list[str]]]:
    """A record's scalars and texts by name (see the module docstring); other values (dicts, ...) are left out."""
    base = series(rec, prefix)
    scalars, texts = {}, {}
    for key, value in rec.items():
        if key in ("step", "kind") or (key in NAME_FIELDS and isinstance(value, str)) or value is None:
            continue
        if isinstance(value, Real):
            scalars[f"{base}/{key}"] = float(value)
        elif isinstance(value, str):
            texts[f"{base}/{key}"] = [value]
        elif isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
            texts[f"{base}/{key}"] = list(value)
    return scalars, texts


def history_at(records: Iterable[dict[str, Any]], step: int) -> list[dict[str, Any]]:
    """The records a run resumed at ``step`` keeps: the rule of ``JsonlLog.truncate_to`` (train records of
    earlier steps, evaluation records up to ``step``, as those of ``step`` itself precede its checkpoint)."""
    return [r for r in records if r["step"] < step or (r["step"] == step and r["kind"] != "train" and step > 0)]


def _record_id(rec: dict[str, Any]) -> tuple[str, int]:
    return series(rec), int(rec["step"])


# ----------------------------------------------------------------------------------------------------------------------
# Opening and fanning out


def check_available(*, wandb: bool = False, tensorboard: bool = False) -> None:
    """Raise a one-line ``UserError`` naming the install command when a requested tracker cannot be imported.
    Call it before any training starts."""
    wanted = [("--wandb", "wandb", "wandb")] if wandb else []
    if tensorboard:
        wanted.append(("--tensorboard", "tensorboard", "torch.utils.tensorboard"))
    for flag, package, module in wanted:
        try:
            importlib.import_module(module)
        except ModuleNotFoundError:
            raise UserError(f"{flag} needs the {package} package: {INSTALL_HINT}") from None
        except Exception as e:  # a broken install, e.g. a protobuf or tensorboard version it cannot use
            raise UserError(f"{flag}: cannot import {package} ({_one_line(e)}); reinstall it: {INSTALL_HINT}") from None


class Trackers:
    """Sends each call to every open backend. A backend that raises is reported once through ``warn``, closed
    as far as it still can be, and left out from then on: tracking never stops a run."""

    def __init__(self, backends: dict[str, Tracker] | None = None, warn: Warn = log.warning) -> None:
        self.backends: dict[str, Tracker] = dict(backends or {})
        self.warn = warn
        self.notes: list[str] = []  # one line per backend saying where it writes, for the caller to print

    def log_config(self, config: dict[str, Any]) -> None:
        self._each(lambda backend: backend.log_config(config))

    def log_record(self, rec: dict[str, Any]) -> None:
        self._each(lambda backend: backend.log_record(rec))

    def close(self, exit_code: int = 0) -> None:
        self._each(lambda backend: backend.close(exit_code), closing=True)
        self.backends.clear()

    def _each(self, call: Callable[[Tracker], object], closing: bool = False) -> None:
        for name, backend in list(self.backends.items()):
            try:
                call(backend)
            except Exception as e:
                self.backends.pop(name)
                self.warn(f"{name} tracking failed and is off for the rest of this run ({_one_line(e)}); "
                          f"log.jsonl still has every record")  # fmt: skip
                if not closing:
                    _close_quietly(backend)

    def __bool__(self) -> bool:
        return bool(self.backends)

    def __enter__(self) -> Trackers:
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        self.close(exit_code=0 if exc_type is None else 1)


def open_trackers(
    out_dir: str | Path,
    *,
    wandb_project: str | None = None,
    wandb_run: str | None = None,
    tensorboard_dir: str | Path | None = None,
    resume_step: int = 0,
    logged: Sequence[dict[str, Any]] = (),
    warn: Warn = log.warning,
) -> Trackers:
    """The trackers of a training run in ``out_dir`` (call on rank 0, once ``out_dir`` exists).

    ``resume_step`` is the step of the checkpoint the run starts from (0 for a fresh start) and ``logged`` the
    records of ``log.jsonl`` as read *before* ``truncate_to(resume_step)``: what earlier attempts may already
    have sent. A backend that cannot be opened is reported through ``warn`` and left out.
    """
    out = Path(out_dir)
    state = read_tracking(out, warn)
    before = dict(state)
    kept = history_at(logged, resume_step)
    trackers = Trackers(warn=warn)
    if tensorboard_dir is not None:
        tb_dir = Path(tensorboard_dir)
        used_before = any(tb_dir.glob("events.out.tfevents.*"))
        # Old event files hold the history before resume_step (the new file purges their later steps).
        replay = [r for r in kept if r["step"] >= resume_step] if used_before else kept
        if _start(trackers, "TensorBoard", lambda: TensorBoardTracker(tb_dir, purge_step=resume_step), replay):
            trackers.notes.append(f"TensorBoard: {tb_dir} (view with: tensorboard --logdir {tb_dir})")
            state["tensorboard"] = {"dir": _relative_to(tb_dir, out)}
    if wandb_project is not None:
        previous = state.get("wandb") or {}
        same_run = previous.get("project") == wandb_project and bool(previous.get("id"))
        run_id = previous["id"] if same_run else secrets.token_hex(4)  # W&B takes any [a-z0-9] id
        state["wandb"] = {"project": wandb_project, "id": run_id}
    if state != before:  # before W&B starts: an interrupted start still leaves the run id to the next attempt
        write_tracking(out, state)
    if wandb_project is not None:

        def open_wandb() -> WandbTracker:
            backend = WandbTracker(out, wandb_project, run_id, name=wandb_run, warn=warn, trainer=True)
            if same_run:  # what earlier attempts sent stays; W&B cannot take it twice
                backend.skip = {_record_id(r) for r in logged}
            return backend

        if _start(trackers, "W&B", open_wandb, [] if same_run else kept):
            trackers.notes.append(trackers.backends["W&B"].describe())  # type: ignore[attr-defined]
    return trackers


def open_run_trackers(run_dir: str | Path, *, prefix: str = "eval", warn: Warn = log.warning) -> Trackers:
    """Trackers for an evaluator adding scores to a run that was tracked (no backend when it was not).

    Records are named ``<prefix>/<kind>/<field>`` (``eval/hellaswag/acc_norm``) so they do not mix with the
    trainer's own evaluations. TensorBoard gets them in ``<tb>/<prefix>`` (a run of its own, out of reach of a
    resuming trainer's purge); W&B in the run's own W&B run. While a trainer is writing that W&B run, two
    writers at once are not safe, so the scores go to an offline segment that ``wandb sync`` uploads later.
    """
    out = Path(run_dir)
    state = read_tracking(out, warn)
    trackers = Trackers(warn=warn)
    if "tensorboard" in state:
        tb_dir = out / state["tensorboard"]["dir"] / prefix
        _start(trackers, "TensorBoard", lambda: TensorBoardTracker(tb_dir, purge_step=None, prefix=prefix), [])
    if "wandb" in state:
        project, run_id = state["wandb"]["project"], state["wandb"]["id"]
        _start(trackers, "W&B", lambda: WandbTracker(out, project, run_id, prefix=prefix, warn=warn, trainer=False), [])
    return trackers


def _start(trackers: Trackers, name: str, open_backend: Callable[[], Tracker], replay: Iterable[dict]) -> bool:
    """Open a backend and send it ``replay``; if that fails, warn once and leave it out."""
    backend = None
    try:
        backend = open_backend()
        for rec in replay:
            backend.log_record(rec)
    except Exception as e:
        trackers.warn(f"{name} tracking is off: {_one_line(e)}")
        if backend is not None:
            _close_quietly(backend)
        return False
    trackers.backends[name] = backend
    return True


# ----------------------------------------------------------------------------------------------------------------------
# TensorBoard


class TensorBoardTracker:
    """A ``torch.utils.tensorboard.SummaryWriter``: one new event file in ``log_dir`` per tracker.

    ``purge_step``: passed to SummaryWriter, which starts the file with a session start event at that step:
    TensorBoard then drops what earlier event files in the directory hold at steps >= ``purge_step``. The trainer
    always passes one (0 when starting afresh, which also hides an earlier run's files); an evaluator passes None.

    SummaryWriter writes from a background thread. Flushing after each call waits for that thread, so a record is
    in the file when ``log_record`` returns (a killed run keeps it), and re-raises here an error the thread hit
    (disk full) so that ``Trackers`` can report it; the thread also prints that error's traceback to stderr.
    """

    def __init__(self, log_dir: Path, purge_step: int | None, prefix: str = "") -> None:
        from torch.utils.tensorboard import SummaryWriter

        _wait_for_a_new_second(log_dir)
        self.writer = SummaryWriter(log_dir, purge_step=purge_step)
        self.prefix, self.start_step = prefix, purge_step or 0

    def log_config(self, config: dict[str, Any]) -> None:
        """The configuration as JSON text (tag ``config``) at the step this writer starts from."""
        text = json.dumps(config, indent=2, sort_keys=True, default=str)
        self.writer.add_text("config", _code_block(text), self.start_step)
        self.writer.flush()

    def log_record(self, rec: dict[str, Any]) -> None:
        scalars, texts = record_values(rec, self.prefix)
        step = int(rec["step"])
        for name, value in scalars.items():
            self.writer.add_scalar(name, value, step)
        for name, lines in texts.items():
            self.writer.add_text(name, "\n\n".join(_code_block(t) for t in lines), step)
        self.writer.flush()

    def close(self, exit_code: int = 0) -> None:
        self.writer.close()


def _wait_for_a_new_second(log_dir: Path) -> None:
    """Wait until the clock has left the second named by the newest event file in ``log_dir``. TensorBoard reads
    a directory's files in name order, and SummaryWriter names a file by its second, then by pid and a counter,
    which are not in creation order ("...pid.10" < "...pid.9"): a file opened in the same second as an earlier
    one could be read first, and its purge would then miss the steps it redoes."""
    newest = max((int(p.name.split(".")[3]) for p in log_dir.glob("events.out.tfevents.*")), default=0)
    wait = newest + 1 - time.time()
    if 0 < wait <= 1:  # more: a clock running ahead named that file, and waiting for it would not help
        time.sleep(wait)


def _code_block(text: str) -> str:
    """Markdown that shows ``text`` verbatim (an indented code block)."""
    return "\n".join("    " + line for line in text.split("\n"))


# ----------------------------------------------------------------------------------------------------------------------
# Weights & Biases


class WandbTracker:
    """One W&B run with a fixed id, resumed if it exists. Every record is one history row with a ``step`` field,
    and every chart's x-axis is ``step``; texts are logged as HTML (``sample/text``).

    The mode is W&B's (``WANDB_MODE``, ``wandb offline``); when the server cannot be reached (no network, no API
    key, a timeout after ``WANDB_INIT_TIMEOUT_S``) the run is written offline instead, with one warning. A trainer
    (``trainer=True``) holds ``<out>/wandb/.trainer.lock`` while the run is open; an evaluator that finds it
    held writes offline, as two processes writing one online run at once is not safe.
    """

    def __init__(
        self,
        out_dir: Path,
        project: str,
        run_id: str,
        *,
        name: str | None = None,
        prefix: str = "",
        warn: Warn = log.warning,
        trainer: bool = True,
    ) -> None:
        import wandb

        self.out_dir, self.prefix = Path(out_dir), prefix
        self.skip: set[tuple[str, int]] = set()  # records earlier attempts already sent: (series, step)
        wandb_dir = self.out_dir / "wandb"
        wandb_dir.mkdir(parents=True, exist_ok=True)
        self._lock = _lock(wandb_dir / WANDB_LOCK, wait_s=TRAINER_LOCK_WAIT_S if trainer else 0.0)
        try:
            self.run = self._init(wandb, project, run_id, name, offline=self._lock is None and not trainer, warn=warn)
        except BaseException:
            if self._lock is not None:
                self._lock.close()
            raise
        self.run.define_metric("step")
        self.run.define_metric("*", step_metric="step", step_sync=True)

    def _init(self, wandb: Any, project: str, run_id: str, name: str | None, offline: bool, warn: Warn) -> Any:
        wandb_dir = self.out_dir / "wandb"
        if offline:
            warn(f"a training run holds W&B run {run_id}: these records go to an offline segment in "
                 f"{wandb_dir}; upload it after training with: wandb sync {wandb_dir}")  # fmt: skip
        settings = wandb.Settings(init_timeout=WANDB_INIT_TIMEOUT_S)
        kwargs = dict(project=project, id=run_id, name=name, resume="allow", dir=str(self.out_dir))
        kwargs.update(reinit="create_new", settings=settings)
        try:
            return wandb.init(mode="offline" if offline else None, **kwargs)
        except Exception as e:
            if offline:
                raise
            warn(f"W&B cannot go online ({_one_line(e)}); writing the run offline into {wandb_dir}, "
                 f"upload it later with: wandb sync {wandb_dir}")  # fmt: skip
            _teardown_wandb()  # W&B's service still holds the failed run's id
            return wandb.init(mode="offline", **kwargs)

    def describe(self) -> str:
        where, mode = self.out_dir / "wandb", self.run.settings.mode
        if mode == "offline":
            return f"W&B: offline run {self.run.id} in {where} (upload with: wandb sync {where})"
        return f"W&B: run {self.run.id} at {self.run.url}" if mode == "online" else f"W&B: {mode}"

    def log_config(self, config: dict[str, Any]) -> None:
        self.run.config.update(config, allow_val_change=True)  # W&B turns paths and tuples into JSON itself

    def log_record(self, rec: dict[str, Any]) -> None:
        if _record_id(rec) in self.skip:
            return
        import wandb

        scalars, texts = record_values(rec, self.prefix)
        row: dict[str, Any] = {"step": int(rec["step"]), **scalars}
        for name, lines in texts.items():
            row[name] = wandb.Html("".join(f"<pre>{escape(t)}</pre>" for t in lines), inject=False)
        self.run.log(row)

    def close(self, exit_code: int = 0) -> None:
        try:
            self.run.finish(exit_code=exit_code)
        except Exception:
            _teardown_wandb()  # its service is gone: stop wandb from failing again at interpreter exit
            raise
        finally:
            if self._lock is not None:
                self._lock.close()


def _teardown_wandb() -> None:
    try:
        import wandb

        wandb.teardown()
    except Exception:
        pass


def _lock(path: Path, wait_s: float) -> IO[str] | None:
    """An exclusive ``flock`` on ``path`` (released when the file is closed or the process dies), waiting up
    to ``wait_s`` seconds; None if it stays held elsewhere or the file system does not do locks."""
    import fcntl

    f = open(path, "a")
    deadline = time.monotonic() + wait_s
    while True:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return f
        except BlockingIOError:  # held
            if time.monotonic() < deadline:
                time.sleep(0.5)
                continue
        except OSError:  # no locks here
            pass
        f.close()
        return None


# ----------------------------------------------------------------------------------------------------------------------
# Helpers


def _one_line(e: BaseException) -> str:
    text = str(e).strip().split("\n")[0] or type(e).__name__
    return text if len(text) <= 200 else text[:197] + "..."


def _close_quietly(backend: Tracker) -> None:
    try:
        backend.close(exit_code=1)
    except Exception:
        pass


def _relative_to(path: Path, base: Path) -> str:
    """``path`` relative to ``base`` when inside it (the run directory can then be moved), else absolute."""
    try:
        return str(path.resolve().relative_to(base.resolve()))
    except ValueError:
        return str(path.resolve())
