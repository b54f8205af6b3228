#!/usr/bin/env bash
# The prepared GPU check of every stage (docs/distributed.md says what it covers and what ran where).
#
#   bash scripts/gpu_check.sh [--quick | --full] [--out DIR] [--fail-fast]   # on a machine with NVIDIA GPUs
#   bash scripts/gpu_check.sh --dry-run [--quick | --full] [--out DIR]       # anywhere: print, check configs
#
# Python: $PYTHON, else python3. It must already have torch (the machine's CUDA build: this script never
# installs torch, never runs setup.sh and never downloads from the hub). What else digiq needs and that Python
# lacks is installed with pip, torch pinned at its installed version: `pip install --no-deps -e .` for digiq,
# and each missing package by name (checked by import; a dry run only reports them). Every Python command
# runs from a temporary directory outside the repository, so a check that passes does not lean on the cwd.
#
# --quick (the tiny model only), on one GPU or more:
#   every stage for a few steps in bf16 (collect, finetune-vlm, train-bc, candidates, cache-features,
#   train-critic, extract-policy, evaluate); FSDP with configs/accelerate/fsdp_7b.yaml on all visible GPUs
#   (one process on one GPU): full fine-tuning of a tiny LLaVA, a kill after the step-2 checkpoint, --resume,
#   the export loaded with plain transformers. With 2+ GPUs also DDP: finetune-vlm, train-bc, candidates,
#   cache-features, train-critic.
# --full (the default) adds a real-size LLaVA-1.5-7B architecture with random weights
#   (scripts/make_random_vlm.py): Stage 1 with the shipped LoRA config, feature caching, candidate sampling;
#   with 2+ GPUs also the 7B full fine-tune under FSDP (kill, --resume, export) and train-bc under FSDP.
# Every step's label, command, exit code, wall seconds and peak GPU MiB go to DIR/gpu_check.json with the
# torch / transformers versions and the GPU name (scripts/gpu_run.py --report). Steps go on after a failure
# (their outputs say more than the first error alone) unless --fail-fast; the exit code is 1 if any failed.
set -uo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)

DRY=0
MODE=full
OUT=$REPO/runs/gpu_check
FAILFAST=0
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) DRY=1 ;;
    --quick|--skip-7b) MODE=quick ;;
    --full) MODE=full ;;
    --out) OUT=$2; shift ;;
    --fail-fast) FAILFAST=1 ;;
    -h|--help) sed -n '2,26p' "$0"; exit 0 ;;
    *) echo "gpu_check.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done
case "$OUT" in /*) ;; *) OUT=$PWD/$OUT ;; esac

die() { echo "gpu_check.sh: $*" >&2; exit 1; }
PY=${PYTHON:-python3}
PYBIN=$(command -v "$PY") || die "no Python '$PY' on PATH: set PYTHON to the Python that has this machine's torch"
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
cd "$WORK" || die "cannot enter $WORK"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 WANDB_MODE=disabled
export DIGIQ_GPU_REPORT=$OUT/gpu_check.jsonl DIGIQ_GPU_MODE=$MODE
RUN=$REPO/scripts/gpu_run.py
CFG=$REPO/configs

# ---- the Python: torch present, the rest installed where missing ----------------------------------------
echo "[gpu_check] python: $PYBIN (PYTHON=${PYTHON:-unset, so python3}), mode $MODE, run from $WORK"
PROBE=$("$PY" "$RUN" --probe)
PROBE_RC=$?
printf '%s\n' "$PROBE" | sed 's/^/[gpu_check]   /'
if [ "$PROBE_RC" = 3 ]; then
  die "$PYBIN has no torch: install this machine's CUDA build of torch into it first," \
    "or set PYTHON to a Python that has one (this script never installs torch)"
fi
[ "$PROBE_RC" = 0 ] || die "probing $PYBIN failed (exit $PROBE_RC)"
MISSING=$(printf '%s\n' "$PROBE" | sed -n 's/^missing: //p' | sed 's/ (have .*//')
if [ -n "$MISSING" ]; then
  PKGS=()
  EDITABLE=0
  while IFS= read -r spec; do
    case "$spec" in -e*) EDITABLE=1 ;; *) PKGS+=("$spec") ;; esac
  done <<< "$MISSING"
  TORCH_PIN="torch==$("$PY" -c 'import torch; print(torch.__version__)')"
  if [ "$DRY" = 1 ]; then
    [ "$EDITABLE" = 1 ] && echo "[gpu_check] would install: $PY -m pip install --no-deps -e $REPO"
    [ ${#PKGS[@]} -gt 0 ] &&
      echo "[gpu_check] would install: $PY -m pip install ${PKGS[*]} (constraint $TORCH_PIN)"
  else
    "$PY" -m pip --version >/dev/null 2>&1 ||
      die "$PYBIN has no pip: install pip for it (python3 -m ensurepip) or set PYTHON"
    echo "$TORCH_PIN" > "$WORK/constraints.txt"
    if [ ${#PKGS[@]} -gt 0 ]; then
      echo "[gpu_check] installing: ${PKGS[*]} (constraint $TORCH_PIN)"
      "$PY" -m pip install -q -c "$WORK/constraints.txt" "${PKGS[@]}" || die "pip install ${PKGS[*]} failed"
    fi
    if [ "$EDITABLE" = 1 ]; then
      echo "[gpu_check] installing: pip install --no-deps -e $REPO"
      "$PY" -m pip install -q --no-deps -e "$REPO" || die "pip install --no-deps -e $REPO failed"
    fi
    STILL=$("$PY" "$RUN" --probe | sed -n 's/^missing: //p')
    [ -z "$STILL" ] || die "still missing after pip install: $STILL"
  fi
fi

if [ "$DRY" = 1 ]; then
  NGPU=2  # print every command, the multi-GPU ones included
  CHECK=$WORK/configs.rec
  : > "$CHECK"
else
  NGPU=$("$PY" -c 'import torch; print(torch.cuda.device_count())')
  # DIGIQ_GPU_CHECK_CPU=1: the same steps on the CPU as one "GPU", to test this script's plumbing (accelerate
  # runs the FSDP steps as plain MULTI_CPU there: the report's "distributed" says so)
  [ "${DIGIQ_GPU_CHECK_CPU:-0}" = 1 ] && [ "$NGPU" = 0 ] && NGPU=1
  [ "$NGPU" -gt 0 ] ||
    die "$PYBIN sees no CUDA GPU (torch.cuda.device_count() == 0): run it on a GPU machine, or use --dry-run"
  mkdir -p "$OUT" || die "cannot create $OUT"
  : > "$DIGIQ_GPU_REPORT"
  : > "$OUT/steps.jsonl"
fi
FAILED=()

# record LABEL RC T0 COMMAND: one line of DIR/steps.jsonl.
record() {
  local wall
  wall=$(awk -v a="$3" -v b="$EPOCHREALTIME" 'BEGIN { printf "%.2f", b - a }')
  "$PY" -c 'import json, sys
print(json.dumps({"label": sys.argv[1], "command": sys.argv[4], "rc": int(sys.argv[2]), "wall_s": float(sys.argv[3])}))' \
    "$1" "$2" "$wall" "$4" >> "$OUT/steps.jsonl"
  if [ "$2" != 0 ]; then
    FAILED+=("$1")
    echo "[gpu_check] FAILED: $1 (exit $2)" >&2
    if [ "$FAILFAST" = 1 ]; then finish; fi
  fi
}

# step LABEL [LAUNCHER...] -- DIGIQ_ARGS...: one stage through scripts/gpu_run.py (under LAUNCHER if given).
# In a dry run: print it, and record its arguments for the config check at the end.
step() {
  local label=$1; shift
  local launcher=()
  while [ "$1" != "--" ]; do launcher+=("$1"); shift; done
  shift
  echo "[gpu_check] $label: ${launcher[*]}${launcher[*]:+ }scripts/gpu_run.py $label $*"
  if [ "$DRY" = 1 ]; then
    printf '%s\x1f' "$@" >> "$CHECK"  # checked together at the end: one Python start, not one per stage
    printf '\x1e' >> "$CHECK"
    for word in "${launcher[@]}"; do
      case "$word" in *.yaml) [ -f "$word" ] || die "missing $word" ;; esac
    done
    return 0
  fi
  local t0=$EPOCHREALTIME rc=0
  if [ ${#launcher[@]} -gt 0 ]; then
    "${launcher[@]}" "$RUN" "$label" "$@" || rc=$?
  else
    "$PY" "$RUN" "$label" "$@" || rc=$?
  fi
  record "$label" "$rc" "$t0" "${launcher[*]}${launcher[*]:+ }gpu_run.py $label $*"
}

# shell LABEL COMMAND...: a plain command (building a model, a kill, loading an export); printed in a dry run.
shell() {
  local label=$1; shift
  echo "[gpu_check] $label: $*"
  [ "$DRY" = 1 ] && return 0
  local t0=$EPOCHREALTIME rc=0
  "$@" || rc=$?
  record "$label" "$rc" "$t0" "$*"
}

# finish: the report (or the dry run's config check), then the exit code.
finish() {
  if [ "$DRY" = 1 ]; then
    "$PY" "$RUN" --check-configs "$CHECK" || die "a stage's config does not load (above)"
    echo "[gpu_check] dry run done: nothing ran"
    exit 0
  fi
  "$PY" "$RUN" --report "$OUT" | tee "$OUT/gpu_check.md"
  if [ ${#FAILED[@]} -gt 0 ]; then
    echo "[gpu_check] ${#FAILED[@]} step(s) failed: ${FAILED[*]}" >&2
    exit 1
  fi
  echo "[gpu_check] done"
  exit 0
}

D=$OUT/data
C=$OUT/cands
TINY=tiny:idefics3@image_size=128,patch=16
# train-bc/tiny.yaml names the shipped model repository-relative, which only the repository root resolves
GUI=$REPO/data/pretrained/gui-tiny
ACC=("$PY" -m accelerate.commands.launch)
# FSDP2 full shard, bf16, wrapping LlamaDecoderLayer and CLIPEncoderLayer: the shipped 7B launcher config.
# On a GPU, gpu_run.py fails the step unless accelerate really ran FSDP (on the CPU it runs MULTI_CPU).
FSDP=(env DIGIQ_EXPECT_DISTRIBUTED=FSDP "${ACC[@]}" --config_file "$CFG/accelerate/fsdp_7b.yaml"
  --num_processes "$NGPU")
# The exported model loads with plain transformers, in a fresh Python.
LOADS='import sys
from transformers import AutoModelForImageTextToText as M, AutoProcessor as P
M.from_pretrained(sys.argv[1]); P.from_pretrained(sys.argv[1]); print("loads:", sys.argv[1])'

# ---- 1. the tiny model: every stage on one GPU (precision left at auto: bf16 on the GPU) ---------------
step collect -- sim collect output_dir="$D" num_trajectories=40 overwrite=true
step finetune-vlm -- finetune-vlm --config "$CFG/finetune-vlm/tiny.yaml" model.name_or_path="$TINY" \
  dataset="$D" output_dir="$OUT/ft" max_steps=20 eval_every=10 overwrite=true
step train-bc -- train-bc --config "$CFG/train-bc/tiny.yaml" model.name_or_path="$GUI" dataset="$D" \
  output_dir="$OUT/bc" train.max_steps=20 overwrite=true
step candidates -- candidates dataset="$D" output_dir="$C" source=policy policy="$OUT/bc/policy" \
  num_candidates=16 max_rows=64 overwrite=true
step cache-features -- cache-features dataset="$C" model.name_or_path="$OUT/ft" output_dir="$OUT/feats" \
  rendering=overlay overwrite=true
step train-critic -- train-critic dataset="$C" features="$OUT/feats" output_dir="$OUT/critic" epochs=2 \
  steps_per_epoch=50 overwrite=true
step extract-policy -- extract-policy dataset="$C" features="$OUT/feats" critic_dir="$OUT/critic" \
  init_policy="$OUT/bc/policy" output_dir="$OUT/extract" train.max_steps=20 overwrite=true
step evaluate -- evaluate policy="$OUT/extract/policy" num_episodes=32 output_dir="$OUT/eval"

# ---- 2. FSDP on all visible GPUs (one process on one GPU): save, a kill, --resume, the export ----------
FTT=(finetune-vlm --config "$CFG/finetune-vlm/tiny.yaml" model.name_or_path=tiny:llava lora.enabled=false
  dataset="$D" output_dir="$OUT/fsdp_ft" max_steps=4 save_every=2 max_val_rows=64)
step fsdp-finetune-vlm "${FSDP[@]}" -- "${FTT[@]}" overwrite=true
# a kill after the step-2 checkpoint: drop what came after it, resume under FSDP, load the export
shell fsdp-kill rm -rf "$OUT/fsdp_ft/checkpoints/step-4" "$OUT/fsdp_ft/model" "$OUT/fsdp_ft/_COMPLETE"
step fsdp-finetune-vlm-resume "${FSDP[@]}" -- "${FTT[@]}" --resume
shell fsdp-export-loads "$PY" -c "$LOADS" "$OUT/fsdp_ft/model"

# ---- 3. DDP on all visible GPUs (2+), the tiny model ------------------------------------------------------
if [ "$NGPU" -gt 1 ]; then
  DDP=("${ACC[@]}" --config_file "$CFG/accelerate/ddp_multi_gpu.yaml" --num_processes "$NGPU")
  step ddp-finetune-vlm "${DDP[@]}" -- finetune-vlm --config "$CFG/finetune-vlm/tiny.yaml" \
    model.name_or_path="$TINY" dataset="$D" output_dir="$OUT/ddp_ft" max_steps=20 overwrite=true
  step ddp-train-bc "${DDP[@]}" -- train-bc --config "$CFG/train-bc/tiny.yaml" model.name_or_path="$GUI" \
    dataset="$D" output_dir="$OUT/ddp_bc" train.max_steps=20 train.batch_size=$((32 * NGPU)) overwrite=true
  step ddp-candidates "${DDP[@]}" -- candidates dataset="$D" output_dir="$OUT/ddp_cands" source=policy \
    policy="$OUT/bc/policy" num_candidates=16 max_rows=64 overwrite=true
  step ddp-cache-features "${DDP[@]}" -- cache-features dataset="$C" model.name_or_path="$OUT/ft" \
    output_dir="$OUT/ddp_feats" rendering=overlay overwrite=true
  step ddp-train-critic "${DDP[@]}" -- train-critic dataset="$C" features="$OUT/feats" \
    output_dir="$OUT/ddp_critic" epochs=2 steps_per_epoch=50 batch_size=$((256 * NGPU)) overwrite=true
fi

# ---- 4. --full: the real-size LLaVA-1.5-7B architecture (random weights) ------------------------------------
if [ "$MODE" = full ]; then
  shell make-7b "$PY" "$REPO/scripts/make_random_vlm.py" llava-1.5-7b "$OUT/llava7b"
  step finetune-vlm-7b-lora -- finetune-vlm --config "$CFG/finetune-vlm/llava-1.5-7b.yaml" \
    model.name_or_path="$OUT/llava7b" dataset="$D" output_dir="$OUT/ft7b" max_steps=10 max_val_rows=64 \
    overwrite=true
  step cache-features-7b -- cache-features dataset="$C" model.name_or_path="$OUT/llava7b" \
    output_dir="$OUT/feats7b" rendering=overlay batch_size=17 overwrite=true
  step candidates-7b -- candidates dataset="$D" output_dir="$OUT/cands7b" source=policy \
    policy="$OUT/llava7b" num_candidates=16 batch_size=4 max_rows=16 max_resamples=0 overwrite=true
  # A 7B full fine-tune holds 16 bytes per parameter (float32 weights, gradients, two AdamW moments):
  # ~113 GB, more than one GPU has, so FSDP at 7B needs 2+ GPUs.
  if [ "$NGPU" -gt 1 ]; then
    FT7B=(finetune-vlm --config "$CFG/finetune-vlm/llava-1.5-7b.yaml" model.name_or_path="$OUT/llava7b"
      lora.enabled=false optim.lr=2e-5 dataset="$D" output_dir="$OUT/fsdp_ft7b" max_steps=4 save_every=2
      max_val_rows=64)
    step fsdp-finetune-vlm-7b "${FSDP[@]}" -- "${FT7B[@]}" overwrite=true
    shell fsdp-kill-7b rm -rf "$OUT/fsdp_ft7b/checkpoints/step-4" "$OUT/fsdp_ft7b/model" \
      "$OUT/fsdp_ft7b/_COMPLETE"
    step fsdp-finetune-vlm-7b-resume "${FSDP[@]}" -- "${FT7B[@]}" --resume
    shell fsdp-export-loads-7b "$PY" -c "$LOADS" "$OUT/fsdp_ft7b/model"
    step fsdp-train-bc-7b "${FSDP[@]}" -- train-bc model.name_or_path="$OUT/llava7b" dataset="$D" \
      output_dir="$OUT/fsdp_bc7b" train.max_steps=4 train.batch_size="$NGPU" optim.lr=1e-5 overwrite=true
  fi
fi

finish
