"""Host memory on CPU training (``gpt2/hostmem.py``): freed memory is kept only up to its bound, and glibc's
defaults come back when training ends. Each scenario runs in a fresh process (malloc settings are per process)."""

from __future__ import annotations

import json

import pytest
from support import run_python, tiny

from gpt2 import hostmem
from gpt2.hostmem import keep_freed_memory


@pytest.fixture(autouse=True)
def glibc():
    """The policy is glibc's (>= 2.33); elsewhere (macOS, musl) what is tested is that it stays off."""
    if hostmem._glibc() is None:
        with keep_freed_memory("cpu") as memory:
            assert memory is None
        pytest.skip("no glibc >= 2.33 here: the policy is off, as checked")


MB = 1 << 20
# A step's worth of varying activations: eight 1-32 MB tensors, written (so resident), then freed.
STEPS = """
import json, os, random, torch
from gpt2.hostmem import keep_freed_memory

def rss():
    return int(open('/proc/self/statm').read().split()[1]) * os.sysconf('SC_PAGE_SIZE')

def steps(memory, n=40):
    random.seed(0)
    worst = 0
    for _ in range(n):
        tensors = [torch.empty(random.randint(1, 32) << 20, dtype=torch.uint8).fill_(1) for _ in range(8)]
        del tensors
        memory.after_step()
        worst = max(worst, rss())
    return worst

def freed_stays_resident():
    x = torch.empty(256 << 20, dtype=torch.uint8).fill_(1)
    before = rss()
    del x
    return rss() > before - (128 << 20)
"""


def run_scenario(code: str) -> dict:
    proc = run_python("-c", STEPS + code, env={"OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_freed_memory_stays_within_its_bound_over_many_steps():
    result = run_scenario("""
start = rss()
with keep_freed_memory('cpu', limit_bytes=64 << 20) as bounded:
    bounded_worst = steps(bounded) - start
with keep_freed_memory('cpu', limit_bytes=1 << 40) as unbounded:
    unbounded_worst = steps(unbounded) - start
print(json.dumps(dict(bounded=bounded_worst, trims=bounded.trims, unbounded=unbounded_worst)))
""")
    assert result["trims"] > 0 and result["bounded"] <= 64 * MB + 32 * MB, result  # the bound, and some slack
    assert result["unbounded"] > 128 * MB, result  # without it, the same steps keep far more


def test_glibcs_defaults_come_back_when_train_returns(synthetic, tmp_path):
    cfg = tiny(synthetic, tmp_path, max_steps=2)
    result = run_scenario(f"""
from gpt2.config import train_config
from gpt2.trainer import train
with keep_freed_memory('cpu') as memory:
    inside = freed_stays_resident()
train(train_config(**json.loads({json.dumps(cfg.to_dict())!r})))
print(json.dumps(dict(inside=inside, after_train=freed_stays_resident())))
""")
    assert result == {"inside": True, "after_train": False}


def test_settings_glibc_refuses_leave_the_policy_off(monkeypatch):
    monkeypatch.setattr(hostmem.HostMemory, "_set", lambda self, mmap_threshold, trim_threshold: False)
    with keep_freed_memory("cpu") as memory:
        assert memory is None
    with keep_freed_memory("cuda") as memory:
        assert memory is None  # GPU runs keep their host allocator as it is
