"""Run directories as evaluation targets: telling them from models, loading each checkpoint on every rank, and
scoring the checkpoints a run has not been scored on yet, once or as the trainer writes them (``--watch``).

``eval_hellaswag.py`` and ``python -m gpt2.evaluate`` share this; each supplies what one pass scores and where
it writes the scores.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

import torch

from gpt2.checkpoint import find_checkpoints, is_sharded_checkpoint, load_checkpoint, model_from_checkpoint
from gpt2.distributed import DistContext, all_reduce_sum
from gpt2.errors import UserError
from gpt2.hf import is_hub_id
from gpt2.model import GPT

log = logging.getLogger(__name__)
T = TypeVar("T")


def is_run_dir(target: str | Path) -> bool:
    """A directory for ``ckpt_*`` checkpoints: not a Hugging Face model directory (it has a config.json), nor a
    sharded checkpoint's own directory, nor a hub id that happens to name a folder without checkpoints (``gpt2``
    is also this package's folder)."""
    path = Path(target)
    if not path.is_dir() or (path / "config.json").exists() or is_sharded_checkpoint(path):
        return False
    return bool(find_checkpoints(path)) or not is_hub_id(str(target))


def run_mode(target: str | Path, watch: bool) -> bool:
    """Whether ``target`` is scored as a run directory (``--watch`` may start before the trainer made it)."""
    return is_run_dir(target) or (watch and not Path(target).exists())


def watch_run(
    target: str | Path,
    score_pass: Callable[[], list[T]],
    say: Callable[[str], None],
    nothing_new: str,
    watch: bool,
    interval: float,
) -> list[T]:
    """Run ``score_pass`` (which scores what the run's scores file lacks) once, or every ``interval`` seconds
    until Ctrl-C (KeyboardInterrupt); ``nothing_new`` is said when a single pass found everything scored already."""
    if not watch:
        if not find_checkpoints(target):
            raise UserError(f"{target} holds no ckpt_*.pt checkpoints and is not a Hugging Face model directory")
        results = score_pass()
        if not results:
            say(nothing_new)
        return results
    say(f"watching {target} for new checkpoints every {interval:g}s (Ctrl-C to stop)")
    with _remembered_interrupt() as interrupted:
        results = score_pass()
        while not interrupted.wait(interval):
            results += score_pass()
    # Only Ctrl-C ends a watch, normally as the KeyboardInterrupt it raises. Here that was swallowed: it came
    # while Python ran a finalizer (a progress bar's, a tensor's), which drops exceptions; the event kept it.
    raise KeyboardInterrupt


@contextlib.contextmanager
def _remembered_interrupt() -> Iterator[threading.Event]:
    """SIGINT raises KeyboardInterrupt as usual and also sets the event it yields, so that an interrupt that a
    finalizer swallowed is not lost. Only where Python's own Ctrl-C handler is in place (on the main thread, and
    not where SIGINT is ignored, as in a background job): elsewhere the event stays unset."""
    interrupted = threading.Event()
    in_main = threading.current_thread() is threading.main_thread()
    if not in_main or signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
        yield interrupted
        return

    def on_sigint(signum: int, frame: object) -> None:
        interrupted.set()
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGINT, on_sigint)
    try:
        yield interrupted
    finally:
        signal.signal(signal.SIGINT, previous)


def load_on_every_rank(path: str, ctx: DistContext, skipped: set[str] | None) -> GPT | None:
    """The checkpoint's model on every rank; or, when any rank could not read it, None on every rank if
    ``skipped`` is given (the path is added to it) and a ``UserError`` if not."""
    error = None
    try:
        model = model_from_checkpoint(load_checkpoint(path), path).to(ctx.device).eval()
    except UserError as e:
        model, error = None, e
    failed = all_reduce_sum(torch.tensor([error is not None], dtype=torch.long, device=ctx.device), ctx).item()
    if not failed:
        return model
    if skipped is None:
        raise error or UserError(f"checkpoint {path} cannot be loaded on another rank")
    if path not in skipped:
        log.warning("skipping %s for now: %s", path, error or "unreadable on another rank")
        skipped.add(path)
    return None
