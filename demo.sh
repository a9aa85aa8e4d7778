#!/usr/bin/env bash
# The offline demo: installs what it needs, generates sample data, trains a short CPU run from
# scratch, predicts on held-out sample videos and scores them. Everything lands in demo_output/.
# Took about 12 minutes on 2 CPU cores (with the installs) before the decoder phase of the from-scratch recipe,
# which adds a few minutes (not re-measured). Settings can be overridden: EPOCHS=60 bash demo.sh
set -euo pipefail
cd "$(dirname "$0")"
out="${OUT:-demo_output}"
EPOCHS="${EPOCHS:-40}"
IMG_SIZE="${IMG_SIZE:-64}"
NUM_FRAMES="${NUM_FRAMES:-8}"
bash tools/setup_env.sh requirements.txt
py="${STAR_VENV:-.venv}/bin/python"

echo "== 1/4 sample data: $out/data (training) and $out/heldout (never seen in training)"
"$py" tools/make_sample_data.py --output_dir "$out/data" --seed 0
"$py" tools/make_sample_data.py --output_dir "$out/heldout" --seed 1 --num_videos 16

echo "== 2/4 training from scratch on CPU: $EPOCHS epochs, $NUM_FRAMES frames at ${IMG_SIZE}px"
"$py" main.py --input_dir "$out/data" --output_dir "$out/run" --overwrite --pretrained none \
  --epochs "$EPOCHS" --batch_size 4 --num_frames "$NUM_FRAMES" --img_size "$IMG_SIZE" --workers 1 --eval_every 3

echo "== 3/4 predicting on the held-out videos (annotated videos in $out/annotated_videos)"
"$py" test.py --input_dir "$out/heldout" --output_file "$out/predictions.csv" \
  --model_path "$out/run/best_model.pth" --labels "$out/heldout"

echo "== 4/4 a picture of one annotated frame: $out/annotated_frame.png"
"$py" tools/snapshot.py --predictions "$out/predictions.csv" --annotated_dir "$out/annotated_videos" --output "$out/annotated_frame.png" \
  || echo "(no detection above the threshold to show)"

echo
echo "done. Outputs:"
echo "  $out/predictions.csv            detections on the held-out videos"
echo "  $out/annotated_videos/          H.264 videos with boxes"
echo "  $out/run/                       best_model.pth, training_results.csv, losses.png, metrics.png, confusion_matrix.png"
