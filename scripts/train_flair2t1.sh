#!/usr/bin/env bash
# Train the shipped flair2t1 preset (issue 19: 128 x 128, 2.5-D, 26 real BraTS subjects, bf16 on
# the CPU) with the project's own commands, exactly as it was made (model_weights/MODEL_CARD.md).
# Every step is skipped when its output exists and resumed from its checkpoint otherwise.
#
#   bash scripts/train_flair2t1.sh WORK_DIR [BBDM_ITERS [DECAY_ITERS]]
#
# BBDM_ITERS: the iteration the constant-rate BBDM run was stopped at (see MODEL_CARD.md); the
# run can be resumed further with the same command and a larger number. DECAY_ITERS (default 0):
# then DECAY_ITERS more iterations with the learning rate decaying linearly towards 0
# (--decay-iters), whose last weights are shipped.
set -euo pipefail
WORK=${1:?usage: train_flair2t1.sh WORK_DIR [BBDM_ITERS [DECAY_ITERS]]}
ITERS=${2:-1000}
DECAY=${3:-0}
PY=${PY:-.venv/bin/python}
DATA=${DATA:-../shared/data}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2} OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-PASSIVE}
mkdir -p "$WORK"
PREP=$WORK/prep128c OLD=$WORK/prep128 BBDM=$WORK/bbdm ENC=$WORK/encoder KB=$WORK/kb3 CN=$WORK/controlnet
SPLIT=(--val-fraction 0.12 --test-fraction 0.12)
# shellcheck source=scripts/preset_steps.sh
source "$(dirname "$0")/preset_steps.sh"

[ -d "$OLD" ] || $PY main.py prepare --layout brats --src "$DATA/brats_dev" "$DATA/brats_more" --out "$OLD" --size 128 "${SPLIT[@]}"
[ -d "$PREP" ] || $PY main.py prepare --layout brats --src "$DATA/brats_dev" "$DATA/brats_more" --out "$PREP" --size 128 "${SPLIT[@]}"

# The BBDM: the winning candidate of the comparison (neighbours 1), its first 200 iterations on
# the dataset prepared before input coverage existed (so Brats18_2013_20_1 was still in), then
# resumed on the re-prepared one (its slices without input left out).
BBDM_ARGS=(--channels 32 64 128 256 --neighbours 1 --precision bf16)
if [ ! -f "$BBDM/checkpoint.pt" ]; then
  $PY main.py train-bbdm --data "$OLD" --out "$BBDM" "${BBDM_ARGS[@]}" --iters 200 --val-every 100 --checkpoint-every 100 --quiet
fi
$PY main.py train-bbdm --data "$PREP" --out "$BBDM" "${BBDM_ARGS[@]}" --iters "$ITERS" --resume --quiet
if [ "$DECAY" -gt 0 ]; then
  $PY main.py train-bbdm --data "$PREP" --out "$BBDM" "${BBDM_ARGS[@]}" --iters $((ITERS + DECAY)) \
    --decay-iters "$DECAY" --resume --quiet
fi
$PY main.py half-weights "$BBDM/model.pt" "$WORK/bbdm16.pt"

if [ ! -f "$ENC/encoder.pt" ]; then
  $PY main.py train-retrieval --data "$PREP" --out "$ENC" --patch-size 16 --width 96 --depth 4 --heads 3 \
    --perceptual-blocks 1 3 --iters 400 --eval-every 100 --checkpoint-every 100 --seed 0 --precision bf16 --quiet
fi
[ -d "$KB" ] || $PY main.py build-kb --data "$PREP" --encoder "$ENC/encoder.pt" --out "$KB" --slice-step 3

# The ControlNet (scripts/preset_steps.sh), its best-validation weights (the preset of session 4,
# trained before training kept them, shipped the last ones).
train_controlnet_halved best_controlnet.pt
assemble_preset flair2t1 \
  "FLAIR -> T1 MRI (the method's BraTS setting), 128x128 slices, 2.5-D input (+-1 slice), trained on 19 real BraTS subjects"
