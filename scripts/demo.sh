#!/usr/bin/env bash
# The whole pipeline, offline, on the embedded sample (data/sample/): prepare shards, train a small GPT with
# torchrun (2 CPU processes, or one per GPU), score its checkpoints on HellaSwag, sample text, plot the run.
# Run it through `make demo`, which creates .venv first. Re-running continues where the last run stopped.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
DATA=data/demo
RUN=runs/demo

if [ -z "${NPROC:-}" ]; then
  NPROC=$("$PY" -c "import torch; print(torch.cuda.device_count() or 2)")
fi
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(( $(nproc) / NPROC > 0 ? $(nproc) / NPROC : 1 ))}
start=$SECONDS
step() { printf '\n==> [%ds] %s\n' $((SECONDS - start)) "$*"; }

step "prepare: tokenize data/sample into $DATA"
"$PY" prepare_fineweb.py --input data/sample/wiki.jsonl data/sample/c4.jsonl --out "$DATA" \
  --shard-tokens 131072 --val-shard-tokens 65536

step "train: the 4-layer demo GPT (--model demo: its size and a 200-step run) with torchrun --nproc_per_node=$NPROC, into $RUN"
# --embed-lr 1e-3: at the matrices' 1e-2, AdamW drifts the embedding rows of the ids the sample never holds and the
# loss spikes (README, "Quick start"). More than 2 processes need a larger global batch than the preset's 2,048 tokens.
"$PY" -m torch.distributed.run --standalone --nproc_per_node="$NPROC" train.py \
  --model demo --data "$DATA" --out "$RUN" --lr 1e-2 --min-lr 1e-3 --embed-lr 1e-3 \
  --batch-tokens $(( 1024 * (NPROC > 2 ? NPROC : 2) )) --device auto

step "evaluate: every checkpoint of $RUN on 200 HellaSwag examples (hellaswag_nanogpt), into $RUN/evals.jsonl"
"$PY" eval_hellaswag.py "$RUN" --hellaswag-data data/sample/hellaswag_val_200.jsonl

step "sample: the last checkpoint"
"$PY" -m gpt2.sample "$RUN" --num-samples 3 --max-new-tokens 40

step "plot"
"$PY" -m gpt2.plot "$RUN" -o "$RUN/run.png"

step "done in $((SECONDS - start)) s"
cat <<OUT
  shards            $DATA/ (manifest.json, val_000000.npy, train_*.npy)
  checkpoints       $RUN/ckpt_*.pt
  training log      $RUN/log.jsonl
  scores            $RUN/evals.jsonl
  plot              $RUN/run.png
OUT
