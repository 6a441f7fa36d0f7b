"""The run plot: reads a run's logs (also while they are being appended to) and writes a real PNG."""

from __future__ import annotations

import json
import math
import re
import struct
import zlib
from pathlib import Path

import pytest
from support import run_python

from gpt2.errors import UserError
from gpt2.plot import GPT2_124M_HELLASWAG, GPT2_124M_VAL_LOSS, GPT3_125M_HELLASWAG, draw_run, main, read_run


def make_run(run_dir: Path, steps: int = 200) -> Path:
    """A synthetic run: decaying train loss every step, val every 50, HellaSwag every 100 (by the trainer in
    log.jsonl and by eval_hellaswag.py in hellaswag.jsonl), and a torn last line."""
    run_dir.mkdir()
    records = [{"step": 0, "kind": "config", "seq_len": 1024}]
    for step in range(steps):
        records.append({"step": step, "kind": "train", "loss": 3.0 + 8 * math.exp(-step / 20), "lr": 6e-4})
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


def test_read_run_skips_a_torn_last_line_and_other_kinds(tmp_path):
    curves = read_run(make_run(tmp_path / "run"))
    assert [s for s, _ in curves.train_loss] == list(range(200))
    assert [s for s, _ in curves.val_loss] == [0, 50, 100, 150]
    assert curves.val_loss[1] == (50, pytest.approx(3.1 + 8 * math.exp(-2.5)))
    # sorted by step; where both scored a step, hellaswag.jsonl wins over the trainer's record
    assert curves.hellaswag == [(0, 0.25), (100, 0.275), (150, 0.2)]


def test_figure_has_the_curves_and_the_reference_lines(tmp_path):
    fig = draw_run(read_run(make_run(tmp_path / "run")))
    ax_loss, ax_hs = fig.axes
    lines = {line.get_label().split(" (")[0]: line for line in ax_loss.lines}
    assert list(lines["val loss"].get_xdata()) == [0, 50, 100, 150]
    assert list(lines["OpenAI GPT-2"].get_ydata()) == [GPT2_124M_VAL_LOSS] * 2
    assert ax_loss.get_ylim()[1] < 4.5  # not squashed by the initial loss of ~11
    hs_refs = sorted(line.get_ydata()[0] for line in ax_hs.lines if line.get_label().startswith("OpenAI"))
    assert hs_refs == [GPT2_124M_HELLASWAG, GPT3_125M_HELLASWAG]
    assert list(ax_hs.lines[0].get_ydata()) == [0.25, 0.275, 0.2]


def test_plot_writes_a_png(tmp_path, capsys):
    run_dir = make_run(tmp_path / "run")
    main([str(run_dir)])
    assert capsys.readouterr().out == f"wrote {run_dir / 'run.png'}\n"
    assert png_size((run_dir / "run.png").read_bytes()) == (1540, 550)  # 14 x 5 inches at 110 dpi
    main([str(run_dir), "-o", str(tmp_path / "plots" / "other.png")])
    assert png_size((tmp_path / "plots" / "other.png").read_bytes()) == (1540, 550)
    assert not list(tmp_path.rglob("*.tmp"))


def test_bad_runs_are_one_line_errors(tmp_path):
    with pytest.raises(UserError, match="nothing to plot"):
        read_run(tmp_path)
    (tmp_path / "log.jsonl").write_text('{"step": 1, "kind": "train", "loss": 3.0}\nnot json\n{"step": 2}\n')
    with pytest.raises(UserError, match=f"^{re.escape(str(tmp_path / 'log.jsonl'))}:2: not valid JSON"):
        read_run(tmp_path)


@pytest.mark.slow
def test_without_matplotlib_one_clear_line(tmp_path):
    run_dir = make_run(tmp_path / "run")
    code = "import sys; sys.modules['matplotlib'] = None; from gpt2.errors import run_cli; from gpt2.plot import main; "
    proc = run_python("-c", code + f"run_cli(lambda: main([{str(run_dir)!r}]))")
    assert proc.returncode == 2
    assert proc.stderr == "error: plotting needs matplotlib: pip install 'gpt2[plot]' (or pip install matplotlib)\n"
    assert not (run_dir / "run.png").exists()
