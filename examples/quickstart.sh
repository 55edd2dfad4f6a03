#!/usr/bin/env bash
# The main job: train the quickstart model on bundled rMD17 aspirin frames (CPU, a fixed
# number of epochs sized to about 8 minutes on 2 cores), compile it for ASE with nequip-compile
# (AOTInductor), draw its test-set parity and learning curve, and run NVE molecular dynamics
# of aspirin with the compiled model.
#
#   bash examples/quickstart.sh [output directory] [config]
#
# config: quickstart (explicit Equiformer, default) or deq_quickstart (deep-equilibrium
# Equiformer; compiled with --target ase_deq so that MD warm-starts its solver every step).
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CONFIG="${2:-quickstart}"
OUT="$(mkdir -p "${1:-outputs/$CONFIG}" && cd "${1:-outputs/$CONFIG}" && pwd)"
TARGET=ase
if [[ "$CONFIG" == deq* ]]; then TARGET=ase_deq; fi

echo "== 1/4 training (nequip-train, configs/$CONFIG.yaml, a line per epoch) -> $OUT/train"
nequip-train -cp "$REPO/configs" -cn "$CONFIG" hydra.run.dir="$OUT/train"

echo "== 2/4 compiling (nequip-compile --mode aotinductor --target $TARGET; this takes a few minutes) -> $OUT/$CONFIG.nequip.pt2"
nequip-compile "$OUT/train/best.ckpt" "$OUT/$CONFIG.nequip.pt2" \
    --mode aotinductor --device cpu --target "$TARGET"

echo "== 3/4 test-set parity and learning curve (nequip-deq-report) -> $OUT/train"
nequip-deq-report "$OUT/train" --model "$OUT/$CONFIG.nequip.pt2"

echo "== 4/4 molecular dynamics (ASE, NVE, aspirin, 300 K, a line every 50 steps) -> $OUT/md"
nequip-deq-md "$OUT/$CONFIG.nequip.pt2" --steps 200 --timestep 0.5 --out "$OUT/md"

echo
echo "model checkpoint:   $OUT/train/best.ckpt"
echo "compiled model:     $OUT/$CONFIG.nequip.pt2"
echo "training log:       $OUT/train/train.log"
echo "metrics per epoch:  $OUT/train/metrics/version_0/metrics.csv"
echo "figures:            $OUT/train/learning_curve.png, $OUT/train/parity.png, $OUT/md/md_energies.png"
if [[ "$TARGET" == ase_deq ]]; then
echo "                    $OUT/md/deq_iterations.png"
fi
echo "MD trajectory:      $OUT/md/md.traj  (view: ase gui $OUT/md/md.traj)"
echo "MD log:             $OUT/md/md.log, every step: $OUT/md/steps.csv"
