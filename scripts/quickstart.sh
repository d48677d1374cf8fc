#!/usr/bin/env bash
# Quickstart (CPU, a few minutes): from the small SAM shipped in modeling_dbsam/pretrained/small-sam
# (pretrained here on generated scenes; its ViT frozen as the paper freezes SAM ViT-B), fine-tune DB-SAM and
# the decoder-only (MedSAM-style) baseline on the real brain-MR sample in data/sample/ (model selection on its
# validation slabs), score both on the test slabs with `dbsam evaluate` (DSC / NSD, paper protocol) and draw
# their predictions. A small model's result, not the paper's: docs/experiments.md has the full ablation.
# Everything goes to outputs/quickstart/ (replaced on every run).
set -euo pipefail
cd "$(dirname "$0")/.."
out=outputs/quickstart
mkdir -p "$out"
config=training/configs/quickstart.yaml
baseline_switches=(--use_channel_attention false --use_conv_branch false --use_fusion false --train_neck false)

# The two trainings run side by side, one core and one thread each: on a 2-core machine that is faster
# than one after the other with two threads each.
echo "training the decoder-only baseline in the background (log: $out/baseline.log)"
OMP_NUM_THREADS=1 python training/train.py --config "$config" --output_dir "$out/baseline" --overwrite_output_dir \
    "${baseline_switches[@]}" --disable_tqdm >"$out/baseline.log" 2>&1 &
baseline=$!
echo "training DB-SAM"
OMP_NUM_THREADS=1 python training/train.py --config "$config" --output_dir "$out/dbsam" --overwrite_output_dir
if ! wait "$baseline"; then
    tail -n 30 "$out/baseline.log" >&2
    exit 1
fi

dbsam evaluate --model "$out/baseline" --data data/sample --split test --protocol paper \
    --output "$out/eval/baseline" --name "decoder-only baseline" --overwrite
dbsam evaluate --model "$out/dbsam" --data data/sample --split test --protocol paper \
    --output "$out/eval/dbsam" --name "DB-SAM" --baseline "$out/eval/baseline/results.json" --overwrite
python scripts/quickstart_overlays.py --data data/sample --models "$out/dbsam" "$out/baseline" \
    --names DB-SAM baseline --output "$out/overlays.png" --overwrite

echo
cat "$out/eval/dbsam/results.md"
echo
echo "models: $out/dbsam, $out/baseline (training curves: tensorboard --logdir $out)"
echo "report: $out/eval/dbsam/results.md, results.png; predictions: $out/overlays.png"
