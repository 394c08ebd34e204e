#!/usr/bin/env bash
# Every GPU number of docs/PERFORMANCE.md in one call, for a lent GPU with minutes to spare:
#
#   OUT=benchmarks/out/gpu bash benchmarks/gpu_session.sh
#
# Runs from the repository root without installing the package (PYTHONPATH), each part under its own
# time limit so that one slow or broken part leaves the others' results: the digits comparison
# (8 parallel runs, then each model alone for its time per step), the Triton kernels' checks and
# timings (one process per sequence length), and `seqvision bench models` on CUDA. Logs and result
# folders go to $OUT, packed into $OUT/results.tar.gz at the end. Wheels in .whl/ (a timm matching
# pyproject, zarr and its needs where the machine lacks them) are installed into /tmp/site first.
# An H200 took 230 s for 11 of the digits comparison's 24 runs (8 at a time), about 15 s for the
# kernel checks and 20-80 s per kernel length, and 117 s for the models: set DIGITS_LIMIT to what
# the lease allows, and finish an interrupted comparison with `--resume` or `--runs-from`.
set -u
OUT=${OUT:-benchmarks/out/gpu}
DIGITS_STEPS=${DIGITS_STEPS:-1000}
DIGITS_BATCH=${DIGITS_BATCH:-64}
DIGITS_LIMIT=${DIGITS_LIMIT:-230}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}

part() {  # part NAME SECONDS COMMAND...: run COMMAND under a limit, log to $OUT/NAME.log, print its tail
    local name=$1 limit=$2 start=$SECONDS
    shift 2
    echo "=== $name (limit ${limit} s): $*"
    timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
    echo "=== $name: exit $? after $((SECONDS - start)) s"
    tail -n "${TAIL:-30}" "$OUT/$name.log"
}

nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv
python3 -c "import torch, triton, timm, accelerate; print('torch', torch.__version__, 'triton', triton.__version__, 'timm', timm.__version__, 'accelerate', accelerate.__version__)"

digits=(python3 -m seqvision bench digits --steps "$DIGITS_STEPS" --batch-size "$DIGITS_BATCH")
TAIL=20 part digits "$DIGITS_LIMIT" "${digits[@]}" --jobs 8 --out "$OUT/digits"
TAIL=14 part digits_alone 60 "${digits[@]}" --seeds 0 --steps 40 --out "$OUT/digits_alone"
for length in 1024 4096 16384 65536; do
    TAIL=12 part "kernels_$length" 150 python3 benchmarks/kernels_gpu.py --lengths "$length" --out "$OUT/kernels_$length"
done
TAIL=40 part models 130 python3 -m seqvision bench models --device cuda --no-flops --repeats 10 \
    --models vir_small_patch16_224,lightnet_small_patch16_224,vim_small_patch16_224 \
    --peer vit_small_patch16_224 --sizes 224,896 --batch-sizes 32 --out "$OUT/models"

tar czf "$OUT/results.tar.gz" -C "$OUT" --exclude results.tar.gz .
ls -la "$OUT"
