"""The GPT-2 BPE tokenizer, built offline from the vendored merge ranks.

tiktoken's own ``get_encoding("gpt2")`` downloads its vocabulary on first use; this module builds the
identical encoding from ``assets/gpt2.tiktoken`` (the r50k_base ranks, checked by sha256), so nothing
here ever touches the network.
"""

from __future__ import annotations

import base64
import functools
import hashlib
from pathlib import Path

import tiktoken

EOT_TOKEN = "<|endoftext|>"
EOT_ID = 50256
N_VOCAB = 50257
RANKS_PATH = Path(__file__).parent / "assets" / "gpt2.tiktoken"
RANKS_SHA256 = "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930"
# tiktoken's r50k/gpt2 split pattern: equivalent to GPT-2's original regex, but faster.
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""


def _load_ranks(path: Path = RANKS_PATH) -> dict[bytes, int]:
    contents = path.read_bytes()
    digest = hashlib.sha256(contents).hexdigest()
    if digest != RANKS_SHA256:
        raise RuntimeError(f"{path} is corrupt: sha256 {digest}, expected {RANKS_SHA256}")
    return {
        base64.b64decode(token): int(rank) for token, rank in (line.split() for line in contents.splitlines() if line)
    }


@functools.cache
def get_encoding() -> tiktoken.Encoding:
    """Return a ``tiktoken.Encoding`` identical to tiktoken's ``"gpt2"``, built without network access.

    Encode documents with ``encode_ordinary`` so that a literal ``<|endoftext|>`` in text stays text.
    """
    return tiktoken.Encoding(
        name="gpt2",
        pat_str=GPT2_PATTERN,
        mergeable_ranks=_load_ranks(),
        special_tokens={EOT_TOKEN: EOT_ID},
        explicit_n_vocab=N_VOCAB,
    )
