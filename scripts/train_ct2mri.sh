#!/usr/bin/env bash
# Train the shipped ct2mri preset (issue 20: 128 x 128, 2.5-D, lesion-aware synthetic CT with the
# texture fitted on real CTs, CT window -30..90 HU, bf16 on the CPU) with the project's own
# commands, exactly as it was made (model_weights/MODEL_CARD.md). Every step is skipped when its
# output exists and resumed from its checkpoint otherwise.
#
#   bash scripts/train_ct2mri.sh WORK_DIR [BBDM_ITERS [DECAY_ITERS]]
#
# BBDM_ITERS: the iteration the constant-rate BBDM run was stopped at (see MODEL_CARD.md); the
# run can be resumed further with the same command and a larger number. DECAY_ITERS (default 0):
# then DECAY_ITERS more iterations with the learning rate decaying linearly towards 0
# (--decay-iters), whose last weights are shipped (without it: the best-validation weights). STAGE=bbdm stops after the BBDM,
# STAGE=encoder trains only the retrieval encoder and its knowledge base (they do not depend on
# the BBDM, so the two can run side by side).
set -euo pipefail
WORK=${1:?usage: train_ct2mri.sh WORK_DIR [BBDM_ITERS [DECAY_ITERS]]}
ITERS=${2:-1000}
DECAY=${3:-0}
STAGE=${STAGE:-all}
PY=${PY:-.venv/bin/python}
DATA=${DATA:-../shared/data}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2} OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-PASSIVE}
mkdir -p "$WORK"
PREP=$WORK/prep BBDM=$WORK/bbdm ENC=$WORK/encoder KB=$WORK/kb3 CN=$WORK/controlnet
# shellcheck source=scripts/preset_steps.sh
source "$(dirname "$0")/preset_steps.sh"

# 27 pseudo-subjects: the MNI template and each of the 26 BraTS anatomies once (new anatomies
# in validation and test), split 21 / 3 / 3.
[ -d "$PREP" ] || $PY main.py prepare --layout open --src "$DATA/brats_dev" "$DATA/brats_more" --out "$PREP" \
  --size 128 --subjects 27 --val-fraction 0.12 --test-fraction 0.12 --ct-window -30 90 --quiet

if [ "$STAGE" != encoder ]; then
  # The flair2t1 BBDM's winning input and width (issue 19: neighbours 1, channels 32..256).
  BBDM_ARGS=(--data "$PREP" --out "$BBDM" --channels 32 64 128 256 --neighbours 1 --precision bf16
    --val-every 100 --checkpoint-every 100 --quiet)
  if [ -f "$BBDM/checkpoint.pt" ]; then RESUME=(--resume); else RESUME=(); fi
  $PY main.py train-bbdm "${BBDM_ARGS[@]}" --iters "$ITERS" "${RESUME[@]}"
  if [ "$DECAY" -gt 0 ]; then
    # The decay phase; its last EMA weights are shipped: the 16-slice validation that picks the
    # best weights swings with each subject's brightness more than the decay's gain shows in it.
    $PY main.py train-bbdm "${BBDM_ARGS[@]}" --iters $((ITERS + DECAY)) --decay-iters "$DECAY" --resume
    $PY main.py half-weights "$BBDM/model.pt" "$WORK/bbdm16.pt"
  else
    # The best validation brain PSNR's EMA weights, not the last (lib/train/loop.py BestWeights).
    $PY main.py half-weights "$BBDM/best_model.pt" "$WORK/bbdm16.pt"
  fi
  [ "$STAGE" = bbdm ] && exit 0
fi

# .done marks a finished run: the trainer writes encoder.pt at every checkpoint too.
if [ ! -f "$ENC/.done" ]; then
  ENC_ARGS=(--data "$PREP" --out "$ENC" --patch-size 16 --width 96 --depth 4 --heads 3 --perceptual-blocks 1 3
    --iters 400 --eval-every 100 --checkpoint-every 100 --seed 0 --precision bf16 --quiet)
  if [ -f "$ENC/checkpoint.pt" ]; then $PY main.py train-retrieval "${ENC_ARGS[@]}" --resume; else $PY main.py train-retrieval "${ENC_ARGS[@]}"; fi
  touch "$ENC/.done"
fi
[ -d "$KB" ] || $PY main.py build-kb --data "$PREP" --encoder "$ENC/encoder.pt" --out "$KB" --slice-step 3
[ "$STAGE" = encoder ] && exit 0

# The ControlNet (scripts/preset_steps.sh), its best-validation weights.
train_controlnet_halved best_controlnet.pt
assemble_preset ct2mri \
  "CT (HU) -> T1 MRI, 128x128 slices, 2.5-D input (+-1 slice), trained on lesion-aware synthetic CT/T1 pairs with real-CT texture (MNI152 + 26 BraTS T1 anatomies)"
