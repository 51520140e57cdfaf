#!/usr/bin/env bash
# The spread of the demo convergence figure over seeds and thread counts (tests/test_bundles.py::
# test_demo_training_aligns_pairs_without_folds): for each seed and thread count, the test's three
# `monai.bundle run` calls (train 2 epochs, resume to 3, evaluate), then val_mse / identity MSE.
#   usage: bash scripts/demo_convergence_spread.sh [ITERATIONS_PER_EPOCH] [SEEDS] [THREADS]
#   e.g.   bash scripts/demo_convergence_spread.sh 50 "0 1 2 3" "1 2"      (about 8 x 45 s on 2 idle cores)
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
iterations=${1:-50}; seeds=${2:-"0 1 2 3"}; threads=${3:-"1 2"}
py=${PYTHON:-$repo/.venv/bin/python}
train="$repo/bundles/gradicon_demo_2d/configs/train.json"
evaluate="['$train','$repo/bundles/gradicon_demo_2d/configs/evaluate.json']"
identity=$(PYTHONPATH=$repo $py -c "
import torch
from monai_gradicon.data import SyntheticPairDataset
val = SyntheticPairDataset((64, 64), length=8, kind='phantom', hollow=False, seed=1000)
print(float(sum(torch.mean((p['moving'] - p['fixed']) ** 2) for p in val) / 8))")
for seed in $seeds; do
  for t in $threads; do
    work=$(mktemp -d)
    common=(--iterations_per_epoch "$iterations" --batch_size 4 --val_pairs 8 --num_threads "$t" --seed "$seed"
            --ckpt_dir "$work/models" --output_dir "$work/eval")
    export OMP_NUM_THREADS=$t PYTHONPATH=$repo
    (cd "$work" && $py -m monai.bundle run --config_file "$train" --epochs 2 "${common[@]}" >/dev/null 2>&1 \
      && $py -m monai.bundle run --config_file "$train" --epochs 3 --resume True "${common[@]}" >/dev/null 2>&1 \
      && $py -m monai.bundle run --config_file "$evaluate" "${common[@]}" >/dev/null 2>&1)
    mse=$(awk -F, '$1=="val_mse"{print $2}' "$work/eval/metrics.csv")
    echo "seed=$seed threads=$t iterations=$((3 * iterations)) val_mse=$mse identity_mse=$identity ratio=$(python3 -c "print(round($mse / $identity, 3))")"
    rm -rf "$work"
  done
done
