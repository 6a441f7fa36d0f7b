"""Everything that needs lm-evaluation-harness (the ``[eval]`` extra): our scorer as the harness's model
``gpt2-pipeline``, and the harness's tasks loaded and scored for the evaluation runner (``gpt2.evaluate``).

The harness owns the tasks, prompts, data and metrics and asks a model only for log-likelihoods of
``(context, continuation)`` strings. ``PipelineLM`` answers them with ``gpt2.scoring``:

* **Tokenisation is the harness's own.** ``PipelineLM`` is a ``TemplateLM``, like the harness's ``hf``
  backend, so the harness itself splits each pair into tokens (a trailing space of the context moves to the
  continuation; an empty context becomes the end-of-text token); the GPT-2 BPE here is tiktoken's, which
  encodes like Hugging Face's GPT-2 tokenizer. Too long a pair is cut on the left exactly as the ``hf``
  backend cuts it, so both score the same tokens and ``acc``/``acc_norm`` come out the same.
* **Shared contexts.** Requests whose (cut) contexts are equal (the choices of one question, or the same
  sentence start in Winogrande) become one packed row: the context is computed once, and the LM head runs
  only where a continuation token is predicted.
* **Ranks.** Under ``torchrun`` every rank receives every request (the harness sees one process), scores a
  strided share of the rows and gathers the rest, so each rank returns what one process would: in fp32 on
  CPU, bit for bit (a row's scores never depend on its batch, see ``gpt2.scoring``).

Importing this module registers the class with the harness under ``gpt2-pipeline``, beside the harness's own
models: after ``import gpt2.lm_eval``, ``lm_eval.simple_evaluate(model="gpt2-pipeline", model_args="pretrained=
RUN_DIR,batch_size=32,device=auto,dtype=bf16", tasks=[...])`` works as well as ``python -m gpt2.evaluate``.
"""

from __future__ import annotations

import difflib
import functools
import statistics
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import lm_eval
import lm_eval.models  # noqa: F401  (the harness's own models, registered before ours: see PipelineLM)
import torch
from lm_eval.api.instance import Instance
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.api.task import Task
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
from tqdm import tqdm

from gpt2.checkpoint import load_model
from gpt2.distributed import DTYPES, DistContext, gather_strided, init_distributed, on_main
from gpt2.errors import UserError
from gpt2.evaluate import GROUPS, EvalResult
from gpt2.hellaswag import TASK as HELLASWAG_NANOGPT
from gpt2.model import GPT
from gpt2.scoring import ContinuationScorer, PackedRow, RowScores, pack_row, score_rows
from gpt2.tokenizer import EOT_ID, get_encoding

# Rows are padded to a multiple of this many tokens (HellaSwag's 8 would leave most batches a single row when
# a few examples of each of many tasks are scored; on a 2-core CPU a batch of rows amortises reading the weights).
ROW_BUCKET = 32
# What the harness hands to ``_loglikelihood_tokens``: (the request's strings or None, context, continuation).
TokenRequest = tuple[tuple[str, str] | None, list[int], list[int]]


# Registered while the harness's registry holds its own models: on an empty registry, the harness's lookup would
# no longer load them (it does so only while the registry is empty), and get_model("hf") would fail.
@register_model("gpt2-pipeline")
class PipelineLM(TemplateLM):
    """A gpt2 checkpoint, run directory (newest checkpoint), Hugging Face directory or hub id, an in-memory
    ``GPT``, or the scorer of one (the runner's, kept across a run's checkpoints), scored with the shared-context
    scorer. ``batch_size`` counts packed rows (one per distinct context) per forward pass; ``dtype`` is the
    autocast dtype (``bf16`` or ``fp32``); ``device`` is ``auto``, ``cpu``, ``cuda`` or ``cuda:N``."""

    def __init__(
        self,
        pretrained: str | GPT | ContinuationScorer,
        batch_size: int | str = 32,
        device: str = "auto",
        dtype: str = "bf16",
    ) -> None:
        super().__init__()
        if dtype not in DTYPES:
            raise UserError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
        if not str(batch_size).isdigit() or int(batch_size) < 1:
            raise UserError(f"batch_size must be a positive number of rows, got {batch_size!r}")
        self.dist = placement(device)
        if isinstance(pretrained, ContinuationScorer):
            self.scorer = pretrained
        else:
            model = pretrained if isinstance(pretrained, GPT) else load_model(pretrained, self.dist.device)[0]
            self.scorer = ContinuationScorer(model.to(self.dist.device).eval())
        self.batch_size = int(batch_size)
        self.dtype = dtype
        self._device = torch.device(self.dist.device)

    @property
    def eot_token_id(self) -> int:
        return EOT_ID

    @property
    def max_length(self) -> int:
        """The longest sequence the model reads: its block size (the ``hf`` backend's ``n_positions``)."""
        return self.scorer.model.config.block_size

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        """GPT-2 BPE, with ``<|endoftext|>`` in the text read as the special token, as Hugging Face's
        tokenizer reads it (GPT-2 adds no BOS, so ``add_special_tokens`` changes nothing)."""
        return get_encoding().encode(string, allowed_special="all")

    def _loglikelihood_tokens(
        self, requests: list[TokenRequest], disable_tqdm: bool = False
    ) -> list[tuple[float, bool]]:
        """``(log-likelihood, greedy)`` of each continuation given its context, in request order."""
        groups: dict[tuple[int, ...], dict[tuple[int, ...], int]] = {}  # cut context -> {continuation: index}
        keys = []
        for _, context, continuation in requests:
            if len(continuation) > self.max_length:
                raise UserError(
                    f"a continuation of {len(continuation)} tokens is longer than the model's "
                    f"context of {self.max_length} tokens"
                )
            # As the hf backend: the model reads (context + continuation)[-(max_length + 1):][:-1], so the
            # context keeps its last max_length + 1 - len(continuation) tokens (at least one).
            ctx, cont = tuple(context[-(self.max_length + 1 - len(continuation)) :]), tuple(continuation)
            group = groups.setdefault(ctx, {})
            group.setdefault(cont, len(group))
            keys.append((ctx, cont))
        rows = [pack_row(list(ctx), [list(c) for c in group], ROW_BUCKET) for ctx, group in groups.items()]
        per_row = [s.per_continuation(row.continuation_lens) for row, s in zip(rows, self._score(rows, disable_tqdm))]
        scores = dict(zip(groups, per_row))  # cut context -> (summed loss, greedy) of each of its continuations
        results = []
        for ctx, cont in keys:
            loss, greedy = scores[ctx][groups[ctx][cont]]
            results.append((-loss, greedy))
        return results

    def _score(self, rows: list[PackedRow], disable_tqdm: bool) -> list[RowScores]:
        """Every row's ``RowScores``, in order: this rank scores ``rows[rank::world_size]`` and gathers the rest."""
        local = rows[self.dist.rank :: self.dist.world_size]
        disable = disable_tqdm or not self.dist.is_main
        with tqdm(total=len(local), desc="scoring rows", unit="row", disable=disable, leave=False) as bar:
            scores = score_rows(
                self.scorer, local, self.dist.device, batch_size=self.batch_size, dtype=self.dtype,
                greedy=True, on_batch=bar.update,  # the harness asks whether each continuation is greedy
            )  # fmt: skip
        return gather_strided(scores, self.dist)

    def loglikelihood_rolling(self, requests: list[Instance], disable_tqdm: bool = False) -> list[float]:
        """Log-likelihood of whole documents (perplexity tasks), over the harness's own rolling windows:
        the first predicted from the end-of-text token, each later one with as much context as fits."""
        windows: list[TokenRequest] = []
        owner = []
        for i, (string,) in enumerate(request.args for request in requests):
            token_windows = get_rolling_token_windows(
                token_list=self.tok_encode(string),
                prefix_token=self.prefix_token_id,
                max_seq_len=self.max_length,
                context_len=1,
            )
            for context, continuation in map(make_disjoint_window, token_windows):
                windows.append((None, context, continuation))
                owner.append(i)
        totals = [0.0] * len(requests)
        for i, (loglikelihood, _) in zip(owner, self._loglikelihood_tokens(windows, disable_tqdm)):
            totals[i] += loglikelihood
        return totals

    def generate_until(self, requests: list[Instance], disable_tqdm: bool = False) -> list[str]:
        tasks = sorted({str(request.task_name) for request in requests})
        raise UserError(generation_error(tasks))


def generation_error(tasks: list[str]) -> str:
    """The one-line error for tasks whose output is generated text."""
    return (
        f"{', '.join(tasks)}: generation tasks (output_type generate_until) are not supported; "
        "gpt2-pipeline scores log-likelihoods only (multiple-choice and perplexity tasks)"
    )


def placement(device: str) -> DistContext:
    """This process's place for a harness ``device``: ``init_distributed``'s, on the GPU that ``cuda:N`` names when
    it runs alone (under torchrun every rank drives its own local GPU)."""
    kind, _, index = device.partition(":")
    ctx = init_distributed(kind)
    if not index or ctx.world_size > 1:
        return ctx
    if not index.isdigit() or (kind == "cuda" and int(index) >= torch.cuda.device_count()):
        raise UserError(f"device {device!r}: no such device ({torch.cuda.device_count()} CUDA GPUs are visible)")
    return replace(ctx, device=f"{kind}:{index}")


# ----------------------------------------------------------------------------------------------------------------------
# The harness's tasks


@functools.cache
def task_manager() -> Any:
    """The harness's index of its task configs (built once per process: it reads thousands of YAML files)."""
    from lm_eval.tasks import TaskManager

    return TaskManager()


def load_tasks(names: list[str], data_dir: Path | None = None) -> dict[str, Task]:
    """The harness's tasks, with their data read from ``data_dir`` when given. Unknown names, missing
    files and generation tasks are ``UserError``s before anything is scored."""
    manager = task_manager()
    for name in names:
        if name not in manager.all_tasks:
            close = difflib.get_close_matches(name, [*manager.all_tasks, HELLASWAG_NANOGPT, *GROUPS], n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise UserError(
                f"unknown task {name!r}{hint}: not an lm-evaluation-harness task, group or tag, nor one of this "
                f"project's ({HELLASWAG_NANOGPT}, {', '.join(GROUPS)}); `lm_eval ls tasks` lists the harness's"
            )
    if data_dir is None:
        tasks = manager.load(names)["tasks"]
    else:
        with tempfile.TemporaryDirectory() as tmp:
            yamls = [_local_task_yaml(manager, name, Path(data_dir), Path(tmp)) for name in names]
            tasks = manager.load(yamls)["tasks"]
    generating = [name for name, task in tasks.items() if task.OUTPUT_TYPE == "generate_until"]
    if generating:
        raise UserError(generation_error(generating))
    return tasks


def _local_task_yaml(manager: Any, name: str, data_dir: Path, tmp: Path) -> str:
    """A task file that includes the harness's own config of ``name`` and changes only where the data comes
    from: the validation split is ``data_dir/<name>_validation.jsonl`` and it is the split scored."""
    import yaml

    if name not in manager.all_subtasks:
        raise UserError(f"--data-dir reads one file per task; {name!r} is a harness group or tag, list its tasks")
    path = data_dir / f"{name}_validation.jsonl"
    if not path.is_file():
        raise UserError(
            f"{path} does not exist: --data-dir needs {name}'s validation split as JSON lines "
            "with the hub dataset's own field names"
        )
    config = {
        "include": str(manager.task_index[name].yaml_path),
        "task": name,
        "dataset_path": "json",
        "dataset_name": None,
        "dataset_kwargs": {"data_files": {"validation": str(path.resolve())}},
        "training_split": None,
        "validation_split": "validation",
        "test_split": None,
        "fewshot_split": None,
    }
    task_yaml = tmp / f"{name}.yaml"
    task_yaml.write_text(yaml.safe_dump(config))
    return str(task_yaml)


def harness_choices(sample: dict[str, Any]) -> tuple[int, int]:
    """The acc and acc_norm choices of one multiple-choice example as the harness logs it (``log_samples``):
    the most likely choice, and the most likely per character of the choice."""
    lls = [ll for ll, _ in sample["filtered_resps"]]
    per_char = [ll / len(choice) for ll, (_, choice) in zip(lls, sample["arguments"])]
    argmax = lambda values: max(range(len(values)), key=values.__getitem__)
    return argmax(lls), argmax(per_char)


def evaluate_tasks(lm: PipelineLM, tasks: dict[str, Task], limit: int | None = None) -> EvalResult:
    """Score ``tasks`` (each on its first ``limit`` examples) with ``lm`` through the harness; every rank
    returns the same result.

    Every rank runs the harness (``lm`` shares the scoring out among them), but the harness hands its
    results to one process per node only (it treats a model that splits requests itself like a
    tensor-parallel one), so rank 0 summarises them for everyone.
    """
    t0 = time.perf_counter()
    out = lm_eval.simple_evaluate(
        model=lm, tasks=list(tasks.values()), limit=limit, bootstrap_iters=0, log_samples=False,
        task_manager=task_manager(),  # else it indexes every task config again
    )  # fmt: skip

    def summarise() -> EvalResult:
        scores, chance = {}, {}
        for name, task in tasks.items():
            metrics = {
                key.split(",")[0]: value
                for key, value in out["results"][name].items()
                if key.endswith(",none") and "_stderr" not in key
            }
            if task.OUTPUT_TYPE == "multiple_choice":
                metrics = {"acc": metrics["acc"], "acc_norm": metrics.get("acc_norm")}
                choices = [len(task.doc_to_choice(doc)) for _, doc in task.doc_iterator(limit=limit)]
                chance[name] = statistics.fmean(1 / k for k in choices)
            scores[name] = {**metrics, "n": out["n-samples"][name]["effective"]}
        return EvalResult(scores, chance, time.perf_counter() - t0)

    return on_main(summarise, lm.dist)
