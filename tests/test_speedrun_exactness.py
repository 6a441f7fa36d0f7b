"""A model with every second-generation piece on stays exact everywhere the one forward pass is used: HellaSwag and
the packed scorer equal one-example-at-a-time scoring through the model's own forward (documents and windows
composed with the packing mask), sampling equals greedy decoding through forward, and torch.compile of training
(forward and backward), of the scorer and of sampling agree with eager."""

from __future__ import annotations

import pytest
import torch
from support import SAMPLE_HELLASWAG, reference_losses, speedrun_model
from torch.nn import functional as F

from gpt2.distributed import DistContext
from gpt2.hellaswag import evaluate, load_examples
from gpt2.sample import generate
from gpt2.scoring import ContinuationScorer, pack_row, score_rows

EOT = 50256


def test_hellaswag_equals_one_example_at_a_time_through_forward():
    model = speedrun_model(seed=5, short_window=4)  # contexts are far longer than the short window
    examples = load_examples(SAMPLE_HELLASWAG, limit=10)
    result = evaluate(model, examples, DistContext(), batch_size=3, dtype="fp32", keep_predictions=True)
    for example, pred in zip(examples, result.predictions):
        sums, means = reference_losses(model, example)
        assert pred.sum_losses == pytest.approx(sums, rel=1e-5)
        assert pred.mean_losses == pytest.approx(means, rel=1e-5)
        assert pred.pred == min(range(4), key=sums.__getitem__)


def rows_with_document_starts(seed: int = 0) -> list[tuple[list[int], list[list[int]]]]:
    """Contexts and continuations with <|endoftext|> in them: a context that begins a document, one with a document
    starting in the middle, continuations that start one (or end with one)."""
    g = torch.Generator().manual_seed(seed)
    words = lambda n: torch.randint(0, 50000, (n,), generator=g).tolist()
    return [
        ([EOT] + words(9), [words(3), words(1), words(5)]),
        (words(6) + [EOT] + words(7), [words(4), [EOT] + words(3), words(2) + [EOT]]),
        (words(3), [[EOT], words(8), words(2) + [EOT] + words(3)]),
        (words(15), [words(6), words(6)]),
    ]


@torch.no_grad()
def one_at_a_time(model, context: list[int], continuation: list[int]) -> list[float]:
    """Each continuation token's loss from the model's forward over context + continuation alone."""
    logits, _ = model(torch.tensor([context + continuation[:-1]]))
    logprobs = F.log_softmax(logits[0].double(), dim=-1)
    return [-logprobs[len(context) - 1 + j, t].item() for j, t in enumerate(continuation)]


@pytest.mark.parametrize("compile", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_packed_scorer_composes_documents_and_windows_with_its_mask(compile):
    model = speedrun_model(seed=6, short_window=5)
    cases = rows_with_document_starts()
    rows = [pack_row(context, continuations) for context, continuations in cases]
    torch._dynamo.reset()
    scores = score_rows(ContinuationScorer(model, compile=compile), rows, "cpu", batch_size=2, dtype="fp32")
    for (context, continuations), score in zip(cases, scores):
        expected = [loss for c in continuations for loss in one_at_a_time(model, context, c)]
        assert score.losses == pytest.approx(expected, rel=1e-5, abs=1e-6)
    # ...and documents matter here: the same rows scored without the document mask differ
    plain = speedrun_model(seed=6, short_window=5, doc_mask=False)
    other = score_rows(ContinuationScorer(plain), rows, "cpu", batch_size=2, dtype="fp32")
    flat = lambda rows_scores: [loss for s in rows_scores for loss in s.losses]
    assert max(abs(a - b) for a, b in zip(flat(other), flat(scores))) > 1e-3


PROMPT = [EOT, 464, 3290, EOT, 318]  # a document starts inside the prompt


@torch.no_grad()
def greedy(model, prompt: list[int], n: int) -> list[int]:
    ids = list(prompt)
    for _ in range(n):
        ids.append(int(model(torch.tensor([ids]))[0][0, -1].argmax()))
    return ids[len(prompt) :]


def test_sampling_equals_greedy_decoding_through_forward():
    model = speedrun_model(seed=7)
    assert (
        generate(model, PROMPT, num_samples=2, max_new_tokens=8, top_k=1, dtype="fp32")
        == [greedy(model, PROMPT, 8)] * 2
    )


@pytest.mark.slow
def test_compiled_sampling_equals_greedy_decoding_through_forward():
    model = speedrun_model(seed=7)
    torch._dynamo.reset()
    compiled = torch.compile(model, dynamic=True)  # as `python -m gpt2.sample --compile` runs it
    assert generate(compiled, PROMPT, num_samples=1, max_new_tokens=8, top_k=1, dtype="fp32") == [
        greedy(model, PROMPT, 8)
    ]


@pytest.mark.slow
def test_compiled_training_forward_and_backward_equal_eager():
    model = speedrun_model(seed=8).train()
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 50257, (2, 48), generator=g)
    x[0, [0, 20]], x[1, 30] = EOT, EOT
    y = torch.roll(x, -1, dims=1)
    runs = []
    torch._dynamo.reset()
    for forward in (model, torch.compile(model)):
        model.zero_grad()
        _, loss = forward(x, y)
        loss.backward()
        runs.append((loss.detach(), [p.grad.clone() for p in model.parameters()]))
    torch.testing.assert_close(runs[1][0], runs[0][0], atol=1e-5, rtol=1e-5)
    for compiled, eager in zip(runs[1][1], runs[0][1]):
        torch.testing.assert_close(compiled, eager, atol=1e-5, rtol=1e-4)
    assert all(g.abs().sum() > 0 for g in runs[0][1])  # every piece takes part (gates, skips, tables)
