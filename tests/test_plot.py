"""The run plot: reads a run's log and scores (also while they are being appended to), draws every series inside its
axes and no panel without data, and writes a real PNG."""

from __future__ import annotations

import json
import math
import re
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from support import SAMPLE_HELLASWAG, run_python, tiny

from gpt2.errors import UserError
from gpt2.evaluate import HellaSwagConfig, run
from gpt2.hellaswag import TASK
from gpt2.plot import GPT2_124M_VAL_LOSS, MIN_SPAN, REFERENCES, draw_run, main, read_run
from gpt2.rundir import add_scores
from gpt2.trainer import train


def make_run(run_dir: Path, steps: int = 200) -> Path:
    """A synthetic run: decaying train loss every step, val every 50, HellaSwag every 100 (by the trainer in
    log.jsonl and by the previous release's eval_hellaswag.py in hellaswag.jsonl), and a torn last line."""
    run_dir.mkdir()
    records = [{"step": 0, "kind": "config", "seq_len": 1024}]
    for step in range(steps):
        loss = 3.0 + 8 * math.exp(-step / 20)
        records.append({"step": step, "kind": "train", "loss": loss, "lr": 6e-4, "tokens": (step + 1) * 2048})
        if step % 50 == 0:
            records.append({"step": step, "kind": "val", "loss": 3.1 + 8 * math.exp(-step / 20)})
        if step in (100, 150):
            records.append({"step": step, "kind": "hellaswag", "acc": 0.25, "acc_norm": 0.2, "n": 500})
    torn = '{"step": 200, "kind": "tr'
    (run_dir / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records) + torn)
    scores = [{"step": s, "acc": 0.26, "acc_norm": 0.25 + s / 4000, "n": 10042} for s in (100, 0)]
    (run_dir / "hellaswag.jsonl").write_text("".join(json.dumps(r) + "\n" for r in scores))
    return run_dir


def png_size(data: bytes) -> tuple[int, int]:
    """Width and height from a PNG's IHDR chunk, after checking the signature and the chunk's CRC."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    length, kind = struct.unpack(">I4s", data[8:16])
    assert kind == b"IHDR" and length == 13
    assert struct.unpack(">I", data[29:33])[0] == zlib.crc32(data[12:29])
    return struct.unpack(">II", data[16:24])


def assert_every_series_inside_and_no_empty_panel(fig) -> None:
    """Every point of every line (data, smoothed, raw, reference) lies inside its panel's axes, as drawn; every
    panel has data beyond its reference lines."""
    fig.canvas.draw()
    assert fig.axes
    for ax in fig.axes:
        box = ax.get_window_extent()
        data_lines = [line for line in ax.lines if not line.get_label().startswith("OpenAI")]
        assert data_lines and all(len(line.get_xdata()) for line in data_lines), f"panel {ax.get_title()!r} is empty"
        for line in ax.lines:
            x, y = line.get_transform().transform(line.get_xydata()).T
            inside = (box.x0 - 0.5 <= x) & (x <= box.x1 + 0.5) & (box.y0 - 0.5 <= y) & (y <= box.y1 + 0.5)
            assert inside.all(), f"{ax.get_title()}: {line.get_label()!r} leaves the axes"


def test_read_run_skips_a_torn_last_line_and_other_kinds(tmp_path):
    curves = read_run(make_run(tmp_path / "run"))
    assert [s for s, _ in curves.train_loss] == list(range(200))
    assert [s for s, _ in curves.val_loss] == [0, 50, 100, 150]
    assert curves.val_loss[1] == (50, pytest.approx(3.1 + 8 * math.exp(-2.5)))
    # sorted by step; where both scored a step, the scores file wins over the trainer's record
    assert curves.tasks == {TASK: [(0, 0.25), (100, 0.275), (150, 0.2)]}
    assert curves.tokens_per_step == 2048 and curves.last_step == 199


def test_figure_has_the_curves_and_the_reference_lines_all_inside_the_axes(tmp_path):
    fig = draw_run(read_run(make_run(tmp_path / "run")))
    assert_every_series_inside_and_no_empty_panel(fig)
    ax_loss, ax_hs = fig.axes
    lines = {line.get_label().split(" (")[0].split(",")[0]: line for line in ax_loss.lines}
    assert list(lines["val loss"].get_xdata()) == [0, 50, 100, 150]
    assert list(lines["OpenAI GPT-2"].get_ydata()) == [GPT2_124M_VAL_LOSS] * 2
    raw = next(line for line in ax_loss.lines if line.get_label().startswith("_"))  # faint, not in the legend
    assert len(raw.get_xdata()) == 200 and raw.get_alpha() < 0.5
    assert ax_loss.get_yscale() == "log" and ax_loss.get_ylim()[1] > 11  # the first steps' loss shows too
    assert ax_hs.get_title() == TASK
    hs_refs = sorted(line.get_ydata()[0] for line in ax_hs.lines if line.get_label().startswith("OpenAI"))
    assert hs_refs == sorted(REFERENCES[TASK].values())
    assert list(ax_hs.lines[0].get_ydata()) == [0.25, 0.275, 0.2]
    assert [ax.child_axes[0].get_xlabel() for ax in fig.axes] == ["tokens", "tokens"]  # the second x-axis


def test_a_short_run_and_its_scores_plot_inside_the_axes(tmp_path):
    """A real run (HellaSwag in the loop and by the evaluator), its val loss above GPT-2's reference from the first
    step, and a task scored on one checkpoint only: every series inside its axes, no empty panel, a readable
    point."""
    rng = np.random.default_rng(0)
    data = tmp_path / "data"
    data.mkdir()
    np.save(data / "val_000000.npy", rng.integers(0, 50257, 4000).astype(np.uint16))
    np.save(data / "train_000001.npy", rng.integers(0, 50257, 20000).astype(np.uint16))
    out = tmp_path / "run"
    train(tiny(data, out, vocab_size=50257, max_steps=10, eval_every=5, hellaswag_every=5, save_every=5,
               hellaswag_data=str(SAMPLE_HELLASWAG), hellaswag_limit=8))  # fmt: skip
    scored = HellaSwagConfig(target=str(out), hellaswag_data=SAMPLE_HELLASWAG, limit=8, dtype="fp32", progress=False)
    run(scored, report=lambda line: None)
    add_scores(out, [{"step": 10, "task": "arc_easy", "acc": 0.25, "acc_norm": 0.3, "n": 8}])
    fig = draw_run(read_run(out))
    assert [ax.get_title() for ax in fig.axes] == ["loss", TASK, "arc_easy"]
    assert_every_series_inside_and_no_empty_panel(fig)
    lone = fig.axes[2]
    assert lone.get_xlim()[0] < 0 and lone.get_xlim()[1] > 10  # the run's steps, not a sliver around step 10
    assert lone.get_ylim()[1] - lone.get_ylim()[0] >= MIN_SPAN


def test_plot_writes_a_png(tmp_path, capsys):
    run_dir = make_run(tmp_path / "run")
    main([str(run_dir)])
    assert capsys.readouterr().out == f"wrote {run_dir / 'run.png'}\n"
    assert png_size((run_dir / "run.png").read_bytes()) == (1320, 462)  # two 6 x 4.2-inch panels at 110 dpi
    main([str(run_dir), "-o", str(tmp_path / "plots" / "other.png")])
    assert png_size((tmp_path / "plots" / "other.png").read_bytes()) == (1320, 462)
    assert not list(tmp_path.rglob("*.tmp"))


def test_bad_runs_are_one_line_errors(tmp_path):
    with pytest.raises(UserError, match="nothing to plot"):
        read_run(tmp_path)
    (tmp_path / "log.jsonl").write_text('{"step": 1, "kind": "train", "loss": 3.0}\nnot json\n{"step": 2}\n')
    with pytest.raises(UserError, match=f"^{re.escape(str(tmp_path / 'log.jsonl'))}:2: not valid JSON"):
        read_run(tmp_path)
    (tmp_path / "log.jsonl").write_text('{"step": 1, "kind": "val", "loss": "high"}\n')
    with pytest.raises(UserError, match=f"^{re.escape(str(tmp_path / 'log.jsonl'))}:1: expected an integer 'step'"):
        read_run(tmp_path)
    (tmp_path / "log.jsonl").unlink()
    (tmp_path / "evals.jsonl").write_text('{"step": 1, "task": "copa", "acc": 0.5}\n{"task": "copa", "acc": 0.5}\n')
    with pytest.raises(UserError, match=f"^{re.escape(str(tmp_path / 'evals.jsonl'))}:2: expected a score record"):
        read_run(tmp_path)


@pytest.mark.slow
def test_without_matplotlib_one_clear_line(tmp_path):
    run_dir = make_run(tmp_path / "run")
    code = "import sys; sys.modules['matplotlib'] = None; from gpt2.errors import run_cli; from gpt2.plot import main; "
    proc = run_python("-c", code + f"run_cli(lambda: main([{str(run_dir)!r}]))")
    assert proc.returncode == 2
    assert proc.stderr == "error: plotting needs matplotlib: pip install 'gpt2[plot]' (or pip install matplotlib)\n"
    assert not (run_dir / "run.png").exists()
