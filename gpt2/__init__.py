"""gpt2: a GPT-2 pretraining pipeline (model, tokenizer, data, training, evaluation)."""

from gpt2.config import GPTConfig
from gpt2.errors import UserError
from gpt2.model import GPT

__all__ = ["GPT", "GPTConfig", "UserError"]
