#!/usr/bin/env bash
# The GPU path, proven in about 5 minutes on a machine with a CUDA GPU. Run from the repo root:
#
#   bash benchmarks/gpu.sh DATA_DIR [OUT_DIR]
#
# DATA_DIR holds the four MNIST .gz files; OUT_DIR (default runs/gpu) gets every run and log,
# and OUT_DIR/gpu-results.txt the figures for the README's "On a GPU" section. It runs:
#   1. the tests marked cuda (tests/test_cuda.py);
#   2. the chapter's `compare mlp cnn` on the full set, on the GPU;
#   3. --preset sprint, fast and best, with wall time and test accuracy (sprint's training
#      seconds are the time to 99%, against 0.76 s published for tuomaso/train_mnist_fast on
#      a laptop GTX 1660 Ti);
#   4. the side-by-side benchmark's cnn row on the GPU, and the peer (tuomaso/train_mnist_fast,
#      benchmarks/contenders/train_mnist_fast.py) on the same GPU, three seeds;
#   5. torchrun --nproc-per-node 1 with nccl.
# PYTHON picks the interpreter (default: .venv/bin/python if there is one, else python3); the
# package runs from src/ when it is not installed. A step that fails is reported, and the next runs.
set -uo pipefail
DATA=${1:?usage: bash benchmarks/gpu.sh DATA_DIR [OUT_DIR]}
OUT=${2:-runs/gpu}
PY=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
mkdir -p "$OUT"
RESULTS="$OUT/gpu-results.txt"
: > "$RESULTS"
say() { echo "$@" | tee -a "$RESULTS"; }
step() {  # step NAME COMMAND...: run it, keep its log, time it
  local name=$1; shift
  local start=$SECONDS
  "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  say "== $name: exit $rc, $((SECONDS - start)) s (log: $OUT/$name.log)"
  [ $rc = 0 ] || tail -n 1 "$OUT/$name.log" | tee -a "$RESULTS"
  return $rc
}

say "GPU: $(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo none)"
say "torch: $($PY -c 'import torch; print(torch.__version__, "cuda", torch.version.cuda, "sees", torch.cuda.device_count(), "GPU")')"

step cuda-tests $PY -m pytest -m cuda -q -p no:cacheprovider tests/test_cuda.py
tail -n 3 "$OUT/cuda-tests.log" | tee -a "$RESULTS"

step compare $PY -m digitlab compare mlp cnn --device cuda --data-dir "$DATA" --out "$OUT/compare" --overwrite
grep -E "test accuracy|images/s|seconds" "$OUT/compare.log" | tail -n 6 | tee -a "$RESULTS"

for seed in 0 1 2; do
  step "peer-$seed" $PY benchmarks/contenders/train_mnist_fast.py --data-dir "$DATA" --device cuda --seed "$seed"
  tail -n 1 "$OUT/peer-$seed.log" | sed "s/^/peer tuomaso\/train_mnist_fast, seed $seed: /" | tee -a "$RESULTS"
done

for preset in sprint fast best; do
  step "preset-$preset" $PY -m digitlab train --preset "$preset" --device cuda --data-dir "$DATA" \
    --out "$OUT/$preset" --overwrite
  grep -E "images in|test accuracy" "$OUT/preset-$preset.log" | tail -n 1 | tee -a "$RESULTS"
done
$PY - "$OUT" <<'PY' | tee -a "$RESULTS"
import json, sys
for preset in ("sprint", "fast", "best"):
    try:
        h = json.load(open(f"{sys.argv[1]}/{preset}/history.json"))
    except OSError:
        continue
    r = h["results"]
    print(f"{preset}: {len(h['epochs'])} epochs, training {h['seconds']:.2f} s, test accuracy {r['test_accuracy']:.2%}"
          + (" (time to 99%: the sprint preset's training seconds; published best 0.76 s, GTX 1660 Ti)"
             if preset == "sprint" else ""))
PY

step side-by-side $PY benchmarks/side_by_side.py --data-dir "$DATA" --device cuda --models cnn \
  --contenders dataloader digitlab --repeats 3
grep -E "^\||digitlab vs" "$OUT/side-by-side.log" | tee -a "$RESULTS"

TORCHRUN=$(dirname "$(command -v $PY)")/torchrun
[ -x "$TORCHRUN" ] || TORCHRUN="$PY -m torch.distributed.run"
step torchrun-nccl $TORCHRUN --standalone --nproc-per-node 1 -m digitlab train cnn --task classify \
  --optimizer adam --lr 0.001 --epochs 1 --device cuda --data-dir "$DATA" --out "$OUT/torchrun" --overwrite
[ -f "$OUT/torchrun/history.json" ] && $PY -c "import json,sys; h=json.load(open('$OUT/torchrun/history.json')); print('torchrun: world_size', h['world_size'], 'backend', h['backend'], 'test accuracy', f\"{h['results']['test_accuracy']:.2%}\", 'training', f\"{h['seconds']:.1f} s\")" | tee -a "$RESULTS"
say "done: $RESULTS"
