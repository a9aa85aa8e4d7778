#!/usr/bin/env bash
# The offline demo: installs what it needs, generates sample data with per-frame labels, trains a short CPU run from
# scratch in tube mode, predicts tubes on held-out videos (frame-mAP and video-mAP printed, annotated videos with
# tube ids), plays one held-out video live through stream.py with tube events, and saves one annotated frame.
# Everything lands in demo_output/. MODE=clip bash demo.sh shows the clip mode (one box per clip, whole-video labels).
# 9.5 min on a 2-core Zen 4 with the environment installed (2026-12-08). Settings can be overridden:
# EPOCHS=40 IMG_SIZE=112 DECODER_STEPS=600 bash demo.sh
set -euo pipefail
cd "$(dirname "$0")"
out="${OUT:-demo_output}"
MODE="${MODE:-tube}"
EPOCHS="${EPOCHS:-30}"
DECODER_STEPS="${DECODER_STEPS:-0}"   # the recipe's decoder phase (600 steps, ~4 more minutes here) is skipped
IMG_SIZE="${IMG_SIZE:-64}"
NUM_FRAMES="${NUM_FRAMES:-8}"
bash tools/setup_env.sh requirements.txt
py="${STAR_VENV:-.venv}/bin/python"
case "$MODE" in
  tube) labels=(--per_frame) ;;
  clip) labels=() ;;
  *) echo "MODE must be tube or clip, got $MODE" >&2; exit 2 ;;
esac

echo "== 1/5 sample data ($MODE mode): $out/data (training) and $out/heldout (never seen in training)"
"$py" tools/make_sample_data.py --output_dir "$out/data" --seed 0 "${labels[@]}"
"$py" tools/make_sample_data.py --output_dir "$out/heldout" --seed 1 --num_videos 16 "${labels[@]}"

echo "== 2/5 training from scratch on CPU: $EPOCHS epochs + $DECODER_STEPS decoder steps, $NUM_FRAMES frames at ${IMG_SIZE}px"
"$py" main.py --input_dir "$out/data" --output_dir "$out/run" --overwrite --pretrained none --mode "$MODE" \
  --epochs "$EPOCHS" --decoder_steps "$DECODER_STEPS" --batch_size 4 --num_frames "$NUM_FRAMES" --img_size "$IMG_SIZE" --workers 1 --eval_every 3

echo "== 3/5 predicting on the held-out videos (annotated videos in $out/annotated_videos)"
"$py" test.py --input_dir "$out/heldout" --output_file "$out/predictions.csv" \
  --model_path "$out/run/best_model.pth" --labels "$out/heldout"

if [[ "$MODE" == tube ]]; then
  first="$(ls "$out/heldout" | grep -E '\.(mp4|avi|mkv|MOV)$' | head -n 1)"
  echo "== 4/5 $first played live through stream.py: tube start/end events in $out/tube_events.csv"
  "$py" stream.py --source "$out/heldout/$first" --model_path "$out/run/best_model.pth" \
    --tube_events "$out/tube_events.csv" --output "$out/live_${first%.*}.mp4"
  cat "$out/tube_events.csv"
fi

echo "== 5/5 a picture of one annotated frame: $out/annotated_frame.png"
"$py" tools/snapshot.py --predictions "$out/predictions.csv" --annotated_dir "$out/annotated_videos" --output "$out/annotated_frame.png" \
  || echo "(no detection above the threshold to show)"

echo
echo "done. Outputs:"
echo "  $out/predictions.csv            detections (tube mode: one row per tube) on the held-out videos"
if [[ "$MODE" == tube ]]; then
  echo "  $out/predictions_frames.csv     every tube's box at every frame, with its tube_id"
  echo "  $out/tube_events.csv            live start/end events of one held-out video"
fi
echo "  $out/annotated_videos/          H.264 videos with boxes (tube mode: class, score and #id)"
echo "  $out/run/                       best_model.pth, training_results.csv, losses.png, metrics.png, confusion_matrix.png"
