"""Weights in and out of Hugging Face transformers, checked by logits against transformers itself."""

import pytest
import torch
from support import run_python, tiny_model

from gpt2.checkpoint import model_payload, save_checkpoint
from gpt2.errors import UserError
from gpt2.hf import load_hf_model
from gpt2.tokenizer import get_encoding

transformers = pytest.importorskip("transformers")

CONFIGS = [
    dict(n_positions=64, n_embd=48, n_layer=2, n_head=3, vocab_size=50257),
    dict(n_positions=32, n_embd=64, n_layer=3, n_head=4, vocab_size=1000),
]


def hf_model(seed: int, **config) -> "transformers.GPT2LMHeadModel":
    torch.manual_seed(seed)
    cfg = transformers.GPT2Config(**config, resid_pdrop=0, embd_pdrop=0, attn_pdrop=0)
    model = transformers.GPT2LMHeadModel(cfg).eval()
    with torch.no_grad():  # random biases and LayerNorm affine too, so a mix-up of any tensor shows
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return model


def hf_logits(model, idx: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(idx).logits


@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize("safe_serialization", [True, False])
def test_from_pretrained_matches_transformers(tmp_path, config, safe_serialization):
    reference = hf_model(0, **config)
    reference.save_pretrained(tmp_path, safe_serialization=safe_serialization)
    model = load_hf_model(tmp_path).eval()
    idx = torch.randint(0, config["vocab_size"], (2, config["n_positions"]))
    with torch.no_grad():
        ours, _ = model(idx)
    assert (ours - hf_logits(reference, idx)).abs().max().item() <= 1e-4


@pytest.mark.slow
def test_export_loads_in_transformers_with_same_logits(tmp_path):
    model = tiny_model(seed=1, vocab_multiple=64).eval()  # padded vocab must be cut on export
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    save_checkpoint(tmp_path / "ckpt_000007.pt", model_payload(model, step=7))
    result = run_python("-m", "gpt2.export", tmp_path / "ckpt_000007.pt", tmp_path / "hf")
    assert result.returncode == 0, result.stderr
    exported = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "hf").eval()
    idx = torch.randint(0, 50257, (2, 64))
    with torch.no_grad():
        ours, _ = model(idx)
    assert (ours - hf_logits(exported, idx)).abs().max().item() <= 1e-4
    # the exported tokenizer is GPT-2's: AutoTokenizer encodes exactly like ours
    text = "Hello, I'm a language model, naïve café 東京 🤖\n\n  tabs\tand <|endoftext|> end"
    tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert tokenizer(text)["input_ids"] == get_encoding().encode(text, allowed_special="all")
    # and the round trip back into our model is exact
    again = load_hf_model(tmp_path / "hf")
    torch.testing.assert_close(
        again.state_dict()["transformer.h.1.mlp.c_fc.weight"], model.transformer.h[1].mlp.c_fc.weight
    )


def test_unknown_hub_id_is_a_user_error():
    with pytest.raises(UserError, match="neither a Hugging Face model directory nor a GPT-2 hub id"):
        load_hf_model("gpt7-huge")


@pytest.mark.slow
def test_offline_hub_download_fails_with_one_line(tmp_path):
    result = run_python("-m", "gpt2.sample", "gpt2-medium", env={"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path)})
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "gpt2-medium" in lines[0] and "--local-dir DIR" in lines[0]
