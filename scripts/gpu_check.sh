#!/usr/bin/env bash
# `make gpu-check`: the numbers a first session on one CUDA GPU should bring back, in one command.
#
#   1. data: shards of data/sample (prepare_fineweb.py), plus random-token train shards for volume;
#   2. training: GPT-2 124M, compiled, bf16, through `torchrun --nproc_per_node=1` (the NCCL path), for
#      $GPU_CHECK_STEPS steps at each micro-batch of $GPU_CHECK_MICRO_BATCHES, for the default recipe (and for
#      `--recipe gpt2` and `--recipe modern` where train.py has that flag): tok/s, MFU, peak memory, compile time;
#      then the first recipe at the first micro-batch with activation checkpointing, with FSDP (sharded over the
#      one GPU: its code path and overheads, not its savings), with both, and with `--micro-batch auto` (the
#      GPU trial of each size): peak memory against the memory plan of each run's log; then modern-v1 with every
#      second-generation piece (flex attention with document masks and windows), with a val pass and a sample;
#   3. eval_hellaswag.py on the trained checkpoint and data/sample's 200 examples: examples/s;
#   4. prepare_fineweb.py on a generated JSONL of varied real text (~1 GB) with 1, 2, 4, 8 and all workers.
#
# Everything lands in $OUT (default runs/gpu-check): gpu_check.json, gpu_check.md (the summary for
# bench/RESULTS.md), each command's output in logs/, each run's log.jsonl in train/. Scratch files (the JSONL,
# shards, checkpoints: several GB) go to $GPU_CHECK_WORK (default $OUT/work), deleted when the script exits.
# Any failing command or result stops the check with its output.
#
# GPU_CHECK_DEVICE=cpu GPU_CHECK_TINY=1 runs the same steps on a CPU with a 4-layer model, one micro-batch size and
# small inputs (the smoke test in `make test`). The sizes can be set by the environment variables read below.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
OUT=${OUT:-runs/gpu-check}
WORK=${GPU_CHECK_WORK:-$OUT/work}
DEVICE=${GPU_CHECK_DEVICE:-cuda}
started=$EPOCHREALTIME

if [ "${GPU_CHECK_TINY:-0}" = 1 ]; then
  model_flags="--model demo --seq-len 64"
  steps=4 micro_batches=4 batch_tokens=512 compile=--no-compile
  hellaswag_limit=50 jsonl_mb=3 workers="1 2" tokens_per_worker=200000 val_shard_tokens=20000
else
  model_flags="--model gpt2"
  steps=30 micro_batches="64 32" batch_tokens=131072 compile=--compile  # 2 micro-steps of 64 x 1024 tokens
  hellaswag_limit=200 jsonl_mb=1000 workers="1 2 4 8 all" tokens_per_worker=10000000 val_shard_tokens=1000000
fi
STEPS=${GPU_CHECK_STEPS:-$steps}
MICRO_BATCHES=${GPU_CHECK_MICRO_BATCHES:-$micro_batches}
BATCH_TOKENS=${GPU_CHECK_BATCH_TOKENS:-$batch_tokens}
JSONL_MB=${GPU_CHECK_JSONL_MB:-$jsonl_mb}
WORKERS=${GPU_CHECK_WORKERS:-$workers}
TOKENS_PER_WORKER=${GPU_CHECK_TOKENS_PER_WORKER:-$tokens_per_worker}

rm -rf -- "$WORK" "$OUT/logs" "$OUT/train" "$OUT/timings.tsv" "$OUT/hellaswag.json" "$OUT"/gpu_check.*
mkdir -p "$WORK" "$OUT/logs" "$OUT/train"
trap 'rm -rf -- "$WORK"' EXIT

# timed SECTION NAME COMMAND...: run COMMAND with its output in logs/SECTION_NAME.log and its wall-clock time
# in timings.tsv; if it fails, show the end of its output and stop.
timed() {
  local section=$1 name=$2 log="$OUT/logs/$1_$2.log" start
  shift 2
  printf '==> [%3ds] %s %s: %s\n' "$(elapsed)" "$section" "$name" "$*"
  start=$EPOCHREALTIME
  if ! "$@" >"$log" 2>&1; then
    echo "gpu-check: FAILED: $*" >&2
    tail -n 40 "$log" >&2
    exit 1
  fi
  printf '%s\t%s\t%s\t%s\n' "$section" "$name" "$start" "$EPOCHREALTIME" >>"$OUT/timings.tsv"
}
elapsed() { echo $((${EPOCHREALTIME%.*} - ${started%.*})); }

# 1. Data
timed data sample "$PY" prepare_fineweb.py --input data/sample/wiki.jsonl data/sample/c4.jsonl --out "$WORK/sample" \
  --shard-tokens 131072 --val-shard-tokens 65536
timed data volume "$PY" bench/synthetic.py shards --like "$WORK/sample" --out "$WORK/train_data" \
  --tokens $((STEPS * BATCH_TOKENS))

# 2. Training
help=$("$PY" train.py --help)
if grep -q -- '--recipe' <<<"$help"; then recipes="gpt2 modern"; else recipes=default; fi
# train_run NAME RECIPE MICRO_BATCH [FLAGS...]: one training run, its log.jsonl kept in $OUT/train/NAME
train_run() {
  local run=$1 recipe=$2 micro_batch=$3 recipe_flags
  shift 3
  recipe_flags=$([ "$recipe" = default ] || echo "--recipe $recipe")
  # shellcheck disable=SC2086  # the flag lists split into words
  timed train "$run" "$PY" -m torch.distributed.run --standalone --nproc_per_node=1 train.py \
    --data "$WORK/train_data" --out "$WORK/runs/$run" $model_flags $recipe_flags \
    --micro-batch "$micro_batch" --batch-tokens "$BATCH_TOKENS" --max-steps "$STEPS" --warmup-steps $((STEPS / 3)) \
    --device "$DEVICE" --dtype bf16 $compile --eval-every 0 --sample-every 0 --save-every 0 --resume never "$@"
  mkdir -p "$OUT/train/$run"
  cp "$WORK/runs/$run/log.jsonl" "$OUT/train/$run/"
}
for recipe in $recipes; do
  for micro_batch in $MICRO_BATCHES; do
    train_run "${recipe}_mb$micro_batch" "$recipe" "$micro_batch"
    first_run=${first_run:-${recipe}_mb$micro_batch}
  done
done
first_recipe=${recipes%% *} first_micro_batch=${MICRO_BATCHES%% *}
if grep -q -- '--activation-checkpointing' <<<"$help"; then
  memory_run="${first_recipe}_mb$first_micro_batch"
  train_run "${memory_run}_ac" "$first_recipe" "$first_micro_batch" --activation-checkpointing
  train_run "${memory_run}_fsdp" "$first_recipe" "$first_micro_batch" --parallel fsdp
  train_run "${memory_run}_fsdp_ac" "$first_recipe" "$first_micro_batch" --parallel fsdp --activation-checkpointing
  train_run "${first_recipe}_auto" "$first_recipe" auto
fi
# The second-generation pieces together (off in the recipes but for those the bench kept): document masks and
# short/long windows through flex attention on CUDA, value embeddings, U-net skips, the x0 mix, Muon on q, k, v
# apart; compiled, with a val pass and a sample at the last step.
if grep -q -- '--window-pattern' <<<"$help"; then
  train_run "pieces_mb$first_micro_batch" modern-v1 "$first_micro_batch" --doc-mask --window-pattern SL \
    --value-embeds 1 --unet-skips --x0-mix --split-qkv --eval-every "$STEPS" --sample-every "$STEPS"
fi

# 3. HellaSwag on the first run's checkpoint
timed hellaswag "$first_run" "$PY" eval_hellaswag.py "$WORK/runs/$first_run/ckpt_$(printf %06d "$STEPS").pt" \
  --hellaswag-data data/sample/hellaswag_val_200.jsonl --limit "$hellaswag_limit" --device "$DEVICE" \
  --out "$OUT/hellaswag.json"

# 4. prepare_fineweb.py: each worker count tokenizes TOKENS_PER_WORKER tokens per worker of the same JSONL
timed data jsonl "$PY" bench/synthetic.py jsonl --source data/sample/c4.jsonl data/sample/wiki.jsonl \
  --mb "$JSONL_MB" --out "$WORK/corpus.jsonl"
for n in $WORKERS; do
  if [ "$n" = all ]; then workers_flag="" count=$(nproc); else workers_flag="--workers $n" count=$n; fi
  # shellcheck disable=SC2086
  timed prepare "$n" "$PY" prepare_fineweb.py --input "$WORK/corpus.jsonl" --out "$WORK/prepare_$n" $workers_flag \
    --max-tokens $((count * TOKENS_PER_WORKER)) --val-shard-tokens "$val_shard_tokens"
done

"$PY" scripts/gpu_check_report.py "$OUT" --work "$WORK" --started "$started" \
  --setting device="$DEVICE" --setting model_flags="$model_flags" --setting dtype=bf16 --setting compile="$compile" \
  --setting steps="$STEPS" --setting micro_batches="$MICRO_BATCHES" --setting batch_tokens="$BATCH_TOKENS" \
  --setting jsonl_mb="$JSONL_MB" --setting workers="$WORKERS" --setting prepare_tokens_per_worker="$TOKENS_PER_WORKER"
echo "gpu-check: passed in $(elapsed) s; summary in $OUT/gpu_check.md, all figures in $OUT/gpu_check.json"
