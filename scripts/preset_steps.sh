# Steps shared by the preset training scripts (sourced by scripts/train_flair2t1.sh and
# scripts/train_ct2mri.sh; they set PY, WORK, PREP, ENC, KB and CN first).

# train_controlnet_halved WEIGHTS_FILE: train (or resume) the ControlNet against the halved BBDM
# $WORK/bbdm16.pt (its hash names the exact weights shipped) with --target own: --target
# reference fell from the BBDM's 15.98 dB to 13.14 dB flair2t1 validation brain PSNR by
# iteration 200 (it pulls the output towards another subject's anatomy). Then halve
# $CN/WEIGHTS_FILE into $WORK/controlnet16.pt.
train_controlnet_halved() {
  local args=(--data "$PREP" --bbdm "$WORK/bbdm16.pt" --kb "$KB" --encoder "$ENC/encoder.pt" --out "$CN"
    --iters "${CN_ITERS:-300}" --batch-size 8 --lr 1e-4 --target own --slerp-fraction 0.25 --val-every 100
    --val-slices 16 --val-steps 10 --checkpoint-every 100 --seed 0 --precision bf16 --quiet)
  if [ -f "$CN/checkpoint.pt" ]; then $PY main.py train-controlnet "${args[@]}" --resume; else $PY main.py train-controlnet "${args[@]}"; fi
  $PY main.py half-weights "$CN/$1" "$WORK/controlnet16.pt"
}

# assemble_preset NAME DESCRIPTION: model_weights/NAME from the halved BBDM and ControlNet, the
# encoder and the knowledge base; STEPS sampling steps (default 5; issue 19: 2 / 5 / 10 steps
# scored 16.33 / 16.23 / 16.19 dB on flair2t1 validation; NOTES.md "Session 7" for ct2mri's 2).
assemble_preset() {
  rm -rf "model_weights/$1"
  $PY main.py make-preset --name "$1" --description "$2" \
    --data "$PREP" --bbdm "$WORK/bbdm16.pt" --encoder "$ENC/encoder.pt" --kb "$KB" --controlnet "$WORK/controlnet16.pt" \
    --steps "${STEPS:-5}" --position-tolerance 0.1 --out "model_weights/$1"
}
