#!/usr/bin/env bash
# The main job: train the quickstart model on bundled rMD17 aspirin frames (CPU, about
# 8 minutes), compile it for ASE with nequip-compile (AOTInductor), and run NVE molecular
# dynamics of aspirin with the compiled model.
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

echo "== 1/3 training (nequip-train, configs/$CONFIG.yaml) -> $OUT/train"
nequip-train -cp "$REPO/configs" -cn "$CONFIG" hydra.run.dir="$OUT/train"

python - "$OUT/train/metrics/version_0/metrics.csv" <<'PY'
import csv, sys
rows = [r for r in csv.DictReader(open(sys.argv[1])) if r.get("test0_epoch/forces_mae")]
if rows:
    r = rows[-1]
    print(f"test set: force MAE {1000 * float(r['test0_epoch/forces_mae']):.1f} meV/A, "
          f"energy MAE {1000 * float(r['test0_epoch/total_energy_mae']):.1f} meV")
PY

echo "== 2/3 compiling (nequip-compile --mode aotinductor --target $TARGET) -> $OUT/$CONFIG.nequip.pt2"
nequip-compile "$OUT/train/best.ckpt" "$OUT/$CONFIG.nequip.pt2" \
    --mode aotinductor --device cpu --target "$TARGET"

echo "== 3/3 molecular dynamics (ASE, NVE, aspirin, 300 K) -> $OUT/md"
nequip-deq-md "$OUT/$CONFIG.nequip.pt2" --steps 200 --timestep 0.5 --out "$OUT/md"

echo
echo "model checkpoint:   $OUT/train/best.ckpt"
echo "compiled model:     $OUT/$CONFIG.nequip.pt2"
echo "training log:       $OUT/train/train.log"
echo "metrics per epoch:  $OUT/train/metrics/version_0/metrics.csv"
echo "MD trajectory:      $OUT/md/md.traj  (view: ase gui $OUT/md/md.traj)"
echo "MD log:             $OUT/md/md.log"
