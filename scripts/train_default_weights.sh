#!/usr/bin/env bash
# Train the shipped ct2mri weights (model_weights/ct2mri) and the earlier 64 x 64 flair2t1 with the
# project's own commands. The shipped flair2t1 (128 x 128, issue 19) comes from
# scripts/train_flair2t1.sh. Every step is skipped when its output exists and resumed from its
# checkpoint when one is there, so the script can be re-run after an interruption.
#
#   bash scripts/train_default_weights.sh WORK_DIR [ct2mri|flair2t1|all]
#
# WORK_DIR holds prepared data and run folders (outside the repo; ~1 GB). The presets are
# assembled into model_weights/. See model_weights/MODEL_CARD.md for the measured results.
set -euo pipefail
WORK=${1:?usage: train_default_weights.sh WORK_DIR [ct2mri|flair2t1|all]}
WHICH=${2:-all}
PY=${PY:-.venv/bin/python}
SHARED=${SHARED:-../shared/data/brats_dev}
mkdir -p "$WORK"

# run_or_resume RUN_DIR COMMAND...: skip a finished run (RUN_DIR/.done; the trainers write their
# weights file at every checkpoint, so it does not mark the end), resume one with a checkpoint.
run_or_resume() {
  local run_dir=$1; shift
  if [ -f "$run_dir/.done" ]; then echo "skip: $run_dir finished"; return; fi
  if [ -f "$run_dir/checkpoint.pt" ]; then "$@" --resume; else "$@"; fi
  touch "$run_dir/.done"
}

train_preset() {
  local name=$1 data=$2 iters_bbdm=$3 target=$4 description=$5
  local bbdm=$WORK/${name}_bbdm enc=$WORK/${name}_encoder kb=$WORK/${name}_kb cn=$WORK/${name}_controlnet
  run_or_resume "$bbdm" $PY main.py train-bbdm --data "$data" --out "$bbdm" \
    --objective plain --channels 32 64 128 --iters "$iters_bbdm" --lr 2e-4 --batch-size 8 \
    --val-every 250 --val-slices 16 --val-steps 10 --checkpoint-every 100 --seed 0 --quiet
  run_or_resume "$enc" $PY main.py train-retrieval --data "$data" --out "$enc" \
    --patch-size 8 --width 96 --depth 4 --heads 3 --perceptual-blocks 1 3 --iters 400 \
    --eval-every 100 --checkpoint-every 100 --seed 0 --quiet
  [ -d "$kb" ] || $PY main.py build-kb --data "$data" --encoder "$enc/encoder.pt" --out "$kb"
  run_or_resume "$cn" $PY main.py train-controlnet --data "$data" \
    --bbdm "$bbdm/model.pt" --kb "$kb" --encoder "$enc/encoder.pt" --out "$cn" --iters 600 \
    --batch-size 8 --lr 1e-4 --target "$target" --slerp-fraction 0.25 --val-every 200 \
    --val-slices 16 --val-steps 10 --checkpoint-every 100 --seed 0 --quiet
  rm -rf "model_weights/$name"
  $PY main.py make-preset --name "$name" --description "$description" --data "$data" \
    --bbdm "$bbdm/model.pt" --encoder "$enc/encoder.pt" --kb "$kb" --controlnet "$cn/controlnet.pt" \
    --steps 10 --position-tolerance 0.1 --out "model_weights/$name"
}

if [ "$WHICH" = all ] || [ "$WHICH" = ct2mri ]; then
  [ -d "$WORK/prep_open64" ] || $PY main.py prepare --layout open --src "$SHARED" --out "$WORK/prep_open64" --size 64 --quiet
  # ControlNet target: the one with the better validation (MODEL_CARD.md compares both).
  train_preset ct2mri "$WORK/prep_open64" 1500 own \
    "CT (HU) -> T1 MRI, 64x64 slices, trained on synthetic CT/T1 pairs (open layout: MNI152 + BraTS T1 bases)"
fi
if [ "$WHICH" = all ] || [ "$WHICH" = flair2t1 ]; then
  [ -d "$WORK/prep_brats64" ] || $PY main.py prepare --layout brats --src "$SHARED" --out "$WORK/prep_brats64" --size 64 --quiet
  train_preset flair2t1 "$WORK/prep_brats64" 1250 reference \
    "FLAIR -> T1 MRI (the method's BraTS setting), 64x64 slices, trained on the real BraTS pairs in shared/data"
fi
