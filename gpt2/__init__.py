"""gpt2: a GPT-2 pretraining pipeline (model, tokenizer, data, training, evaluation).

The package imports nothing on import: ``from gpt2.model import GPT``, ``from gpt2.config import train_config``.
"""
