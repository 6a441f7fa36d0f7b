"""Multi-node rehearsed on one machine: the README's multi-node command, run as two torchrun "nodes" on
localhost (one gloo process each, c10d rendezvous), trains exactly like one node with two processes."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from support import ONE_THREAD, ROOT, cli_flags, losses, read_log, run_python

pytestmark = pytest.mark.slow

# 2 ranks x 1 micro-step of 2 x 32 tokens = one process with 2 micro-steps; validation at steps 0, 3, 6.
RUN = dict(max_steps=6, eval_every=3, micro_batch=2, batch_tokens=128)
TORCHRUN = ["-m", "torch.distributed.run"]  # python's arguments
README_FLAGS = {"--nnodes": "2", "--node-rank": "K", "--nproc-per-node": "8", "--rdzv-backend": "c10d",
                "--rdzv-endpoint": "HOST:29500"}  # fmt: skip


def readme_multinode_command() -> str:
    """The one ``torchrun`` line of the README's multi-node code block."""
    section = (ROOT / "README.md").read_text().split("**Multi-node**", 1)[1]
    block = re.search(r"```bash\n(.*?)```", section, flags=re.S).group(1)
    (command,) = [line for line in block.splitlines() if line.startswith("torchrun ")]
    return command


def torchrun_flags(command: str) -> dict[str, str]:
    """``--flag value`` pairs of a torchrun command line, in order, up to the program it runs."""
    words = command.split()
    program = words.index("train.py")
    assert words[0] == "torchrun" and program % 2 == 1, command
    return dict(zip(words[1:program:2], words[2:program:2]))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_nodes_equal_one_node_with_two_processes(synthetic: Path, tmp_path: Path):
    readme = readme_multinode_command()
    flags = torchrun_flags(readme)
    assert flags == README_FLAGS, f"the README's multi-node command changed: {readme}"
    train_doc = " ".join((ROOT / "train.py").read_text().split())
    assert readme in train_doc, "train.py's docstring should show the README's multi-node command"

    # The README's command on each "node": its index for K, one process per node, a local endpoint for HOST.
    endpoint = f"127.0.0.1:{free_port()}"
    nodes = []
    for rank in (0, 1):
        node_flags = {**flags, "--node-rank": str(rank), "--nproc-per-node": "1", "--rdzv-endpoint": endpoint}
        command = [sys.executable, *TORCHRUN, *(word for pair in node_flags.items() for word in pair), "train.py",
                   *cli_flags(synthetic, tmp_path / "nodes", **RUN)]  # fmt: skip
        nodes.append(subprocess.Popen(command, cwd=ROOT, env={**os.environ, **ONE_THREAD}, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True))  # fmt: skip
    try:
        outputs = [node.communicate(timeout=300)[0] for node in nodes]
    finally:
        for node in nodes:
            node.kill()
    for node, output in zip(nodes, outputs):
        assert node.returncode == 0, output[-3000:]
    assert "2 process(es) on cpu | 128 tokens/step = 2 x 1 x 2 x 32" in "".join(outputs)

    # One node with two processes, and one process accumulating two micro-steps.
    for name, launcher in (("one", [*TORCHRUN, "--standalone", "--nproc_per_node=2"]), ("accumulation", [])):
        r = run_python(*launcher, "train.py", *cli_flags(synthetic, tmp_path / name, **RUN), env=ONE_THREAD)
        assert r.returncode == 0, r.stderr[-3000:]

    two_nodes, one_node, accumulation = (read_log(tmp_path / name) for name in ("nodes", "one", "accumulation"))
    for kind, steps in (("train", [0, 1, 2, 3, 4, 5]), ("val", [0, 3, 6])):
        assert sorted(losses(two_nodes, kind)) == steps
        assert losses(two_nodes, kind) == losses(one_node, kind)  # the same two ranks: bit for bit
        reference = losses(accumulation, kind)
        assert all(loss == pytest.approx(reference[step], rel=1e-5) for step, loss in losses(two_nodes, kind).items())
