#!/usr/bin/env bash
# The prepared GPU check of every stage (docs/distributed.md says what it covers and what ran where).
#
#   bash scripts/gpu_check.sh [--out DIR] [--skip-7b]     # on a machine with NVIDIA GPUs
#   bash scripts/gpu_check.sh --dry-run [--out DIR]       # anywhere: print the commands, check their configs
#
# 1. one GPU, bf16, a tiny model: every stage for a few steps (Stage-1 evaluation on the GPU, the policy in
#    bf16 on the GPU, 16 samples per state from one prefill, bf16 feature caching);
# 2. one GPU, a real-size LLaVA-1.5-7B architecture with random weights (scripts/make_random_vlm.py):
#    Stage 1 with the shipped LoRA config, feature caching, candidate sampling;
# 3. all visible GPUs: DDP (tiny model: finetune-vlm, train-bc, candidates, cache-features, train-critic) and
#    FSDP (the 7B architecture fully fine-tuned with configs/accelerate/fsdp_7b.yaml: save, kill, --resume,
#    export loaded with plain transformers).
# Every stage runs through scripts/gpu_run.py, which appends its wall time and peak GPU memory to
# DIR/gpu_check.jsonl; DIR/gpu_check.md is the table for docs/benchmarks.md. Exits non-zero on the first
# failure.
set -euo pipefail
cd "$(dirname "$0")/.."

DRY=0
OUT=runs/gpu_check
SKIP7B=0
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) DRY=1 ;;
    --out) OUT=$2; shift ;;
    --skip-7b) SKIP7B=1 ;;
    -h|--help) sed -n '2,19p' "$0"; exit 0 ;;
    *) echo "gpu_check.sh: unknown argument $1" >&2; exit 2 ;;
  esac
  shift
done
PY=${PYTHON:-python}
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 WANDB_MODE=disabled DIGIQ_GPU_REPORT="$OUT/gpu_check.jsonl"
if [ "$DRY" = 1 ]; then
  NGPU=2
  CHECK=$(mktemp)
  trap 'rm -f "$CHECK"' EXIT
else
  command -v nvidia-smi >/dev/null || { echo "gpu_check.sh: no nvidia-smi: run it on a GPU machine, or use --dry-run" >&2; exit 1; }
  NGPU=$(nvidia-smi --list-gpus | wc -l)
  mkdir -p "$OUT"
  : > "$DIGIQ_GPU_REPORT"
fi

# step LABEL [LAUNCHER...] -- DIGIQ_ARGS...: one stage through scripts/gpu_run.py (under LAUNCHER if given).
# In a dry run: print it, and load its config with --print-config (unknown keys and bad values fail here).
step() {
  local label=$1; shift
  local launcher=()
  while [ "$1" != "--" ]; do launcher+=("$1"); shift; done
  shift
  echo "[gpu_check] $label: ${launcher[*]} scripts/gpu_run.py $label $*"
  if [ "$DRY" = 1 ]; then
    printf '%s\x1f' "$@" >> "$CHECK"  # checked together at the end: one Python start, not one per stage
    printf '\x1e' >> "$CHECK"
    for word in "${launcher[@]}"; do
      case "$word" in configs/*) [ -f "$word" ] || { echo "missing $word" >&2; exit 1; } ;; esac
    done
  elif [ ${#launcher[@]} -gt 0 ]; then
    "${launcher[@]}" scripts/gpu_run.py "$label" "$@"
  else
    "$PY" scripts/gpu_run.py "$label" "$@"
  fi
}

# shell LABEL COMMAND...: a plain command (data preparation, loading an export); printed in a dry run.
shell() {
  local label=$1; shift
  echo "[gpu_check] $label: $*"
  [ "$DRY" = 1 ] || "$@"
}

D=$OUT/data
C=$OUT/cands
TINY=tiny:idefics3@image_size=128,patch=16
BF16=(mixed_precision=bf16)

# ---- 1. one GPU, tiny model ------------------------------------------------------------------------
step collect -- sim collect output_dir="$D" num_trajectories=40 overwrite=true
step finetune-vlm -- finetune-vlm --config configs/finetune-vlm/tiny.yaml model.name_or_path="$TINY" \
  dataset="$D" output_dir="$OUT/ft" max_steps=20 eval_every=10 "${BF16[@]}" overwrite=true
step train-bc -- train-bc --config configs/train-bc/tiny.yaml dataset="$D" output_dir="$OUT/bc" \
  train.max_steps=20 train.mixed_precision=bf16 overwrite=true
step candidates -- candidates dataset="$D" output_dir="$C" source=policy policy="$OUT/bc/policy" \
  num_candidates=16 max_rows=64 overwrite=true
step cache-features -- cache-features dataset="$C" model.name_or_path="$OUT/ft" output_dir="$OUT/feats" \
  rendering=overlay overwrite=true
step train-critic -- train-critic dataset="$C" features="$OUT/feats" output_dir="$OUT/critic" epochs=2 \
  steps_per_epoch=50 "${BF16[@]}" overwrite=true
step extract-policy -- extract-policy dataset="$C" features="$OUT/feats" critic_dir="$OUT/critic" \
  init_policy="$OUT/bc/policy" output_dir="$OUT/extract" train.max_steps=20 train.mixed_precision=bf16 overwrite=true
step evaluate -- evaluate policy="$OUT/extract/policy" num_episodes=32 output_dir="$OUT/eval"

# ---- 2. one GPU, the real-size LLaVA-1.5-7B architecture (random weights) -------------------------------
if [ "$SKIP7B" = 0 ]; then
  shell make-7b "$PY" scripts/make_random_vlm.py llava-1.5-7b "$OUT/llava7b"
  step finetune-vlm-7b-lora -- finetune-vlm --config configs/finetune-vlm/llava-1.5-7b.yaml \
    model.name_or_path="$OUT/llava7b" dataset="$D" output_dir="$OUT/ft7b" max_steps=10 max_val_rows=64 overwrite=true
  step cache-features-7b -- cache-features dataset="$C" model.name_or_path="$OUT/llava7b" \
    output_dir="$OUT/feats7b" rendering=overlay batch_size=17 overwrite=true
  step candidates-7b -- candidates dataset="$D" output_dir="$OUT/cands7b" source=policy \
    policy="$OUT/llava7b" num_candidates=16 batch_size=4 max_rows=16 max_resamples=0 overwrite=true
fi

# ---- 3. all GPUs: DDP (tiny) and FSDP (7B full fine-tuning: save, --resume, export) ----------------------
if [ "$NGPU" -gt 1 ]; then
  DDP=(accelerate launch --config_file configs/accelerate/ddp_multi_gpu.yaml --num_processes "$NGPU")
  step ddp-finetune-vlm "${DDP[@]}" -- finetune-vlm --config configs/finetune-vlm/tiny.yaml \
    model.name_or_path="$TINY" dataset="$D" output_dir="$OUT/ddp_ft" max_steps=20 "${BF16[@]}" overwrite=true
  step ddp-train-bc "${DDP[@]}" -- train-bc --config configs/train-bc/tiny.yaml dataset="$D" \
    output_dir="$OUT/ddp_bc" train.max_steps=20 train.batch_size=$((32 * NGPU)) overwrite=true
  step ddp-candidates "${DDP[@]}" -- candidates dataset="$D" output_dir="$OUT/ddp_cands" source=policy \
    policy="$OUT/bc/policy" num_candidates=16 max_rows=64 overwrite=true
  step ddp-cache-features "${DDP[@]}" -- cache-features dataset="$C" model.name_or_path="$OUT/ft" \
    output_dir="$OUT/ddp_feats" rendering=overlay overwrite=true
  step ddp-train-critic "${DDP[@]}" -- train-critic dataset="$C" features="$OUT/feats" \
    output_dir="$OUT/ddp_critic" epochs=2 steps_per_epoch=50 batch_size=$((256 * NGPU)) overwrite=true
  if [ "$SKIP7B" = 0 ]; then
    FSDP=(accelerate launch --config_file configs/accelerate/fsdp_7b.yaml --num_processes "$NGPU")
    FT7B=(finetune-vlm --config configs/finetune-vlm/llava-1.5-7b.yaml model.name_or_path="$OUT/llava7b"
      lora.enabled=false optim.lr=2e-5 dataset="$D" output_dir="$OUT/fsdp_ft7b" max_steps=4 save_every=2
      max_val_rows=64)
    step fsdp-finetune-vlm-7b "${FSDP[@]}" -- "${FT7B[@]}" overwrite=true
    # a kill after the step-2 checkpoint: drop what came after, resume under FSDP, load the export
    shell fsdp-kill rm -rf "$OUT/fsdp_ft7b/checkpoints/step-4" "$OUT/fsdp_ft7b/model" "$OUT/fsdp_ft7b/_COMPLETE"
    step fsdp-finetune-vlm-7b-resume "${FSDP[@]}" -- "${FT7B[@]}" --resume
    shell fsdp-export-loads "$PY" -c "from transformers import AutoModelForImageTextToText as M; M.from_pretrained('$OUT/fsdp_ft7b/model')"
    step fsdp-train-bc-7b "${FSDP[@]}" -- train-bc model.name_or_path="$OUT/llava7b" model.dtype=float32 \
      dataset="$D" output_dir="$OUT/fsdp_bc7b" train.max_steps=4 train.batch_size="$NGPU" \
      train.mixed_precision=bf16 optim.lr=1e-5 overwrite=true
  fi
fi

if [ "$DRY" = 1 ]; then
  # Load every stage's config as the CLI would (--print-config): unknown keys and bad values fail here.
  "$PY" - "$CHECK" <<'EOF'
import contextlib, io, sys
from digiq.cli import main
records = [r for r in open(sys.argv[1], encoding="utf-8").read().split("\x1e") if r]
for record in records:
    argv = [a for a in record.split("\x1f") if a]
    with contextlib.redirect_stdout(io.StringIO()):
        code = main([*argv, "--print-config"])
    if code != 0:
        sys.exit(f"gpu_check.sh: config check failed ({code}): digiq {' '.join(argv)}")
print(f"[gpu_check] {len(records)} stage configs load")
EOF
else
  "$PY" - "$DIGIQ_GPU_REPORT" > "$OUT/gpu_check.md" <<'EOF'
import json, sys
rows = [json.loads(x) for x in open(sys.argv[1]) if x.strip()]
print("| stage | processes | seconds | peak GiB (max over processes) |")
print("|---|---|---|---|")
for label in dict.fromkeys(r["label"] for r in rows):
    rs = [r for r in rows if r["label"] == label]
    print(f"| {label} | {rs[0]['processes']} | {max(r['seconds'] for r in rs):.1f} | {max(r['peak_gib'] for r in rs):.2f} |")
EOF
  cat "$OUT/gpu_check.md"
fi
echo "[gpu_check] done"
