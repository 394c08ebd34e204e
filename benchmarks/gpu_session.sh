#!/usr/bin/env bash
# Issue 19's GPU measurements (docs/PERFORMANCE.md) in one call, for a lent GPU, in about 8 minutes:
#
#   OUT=benchmarks/out/gpu bash benchmarks/gpu_session.sh        # from the repository root
#
# Before a lease, on any machine: `TRITON_INTERPRET=1 python benchmarks/kernels_compile.py
# --triton-site DIR` (DIR: `pip install --no-deps --target DIR triton==<the device's version>`)
# compiles every launch below for sm_90 with that Triton, so none of the GPU's minutes go to a
# kernel that does not compile or fit.
#
# Runs without installing the package (PYTHONPATH). Wheels: .whl/ (gitignored; carried to the
# machine with the working tree) holds what the lent machine lacked or may lack, fetched with
# `pip download --no-deps -d .whl fla-core==0.6.0 einops==0.8.2 timm==1.0.31 packaging==26.4`:
#   fla_core-0.6.0-py3-none-any.whl    flash-linear-attention's kernels (`fla.ops`): the peer of
#                                      linear_attention (chunk_simple_gla, chunk_gla)
#   einops-0.8.2-py3-none-any.whl      fla-core's one requirement besides torch and triton
#   packaging-26.4-py3-none-any.whl    imported by fla-core (present on most machines)
#   timm-1.0.31-py3-none-any.whl       the lent H200 had no timm; seqvision's models are timm models
# Each is installed into /tmp/site only where its module does not already import there.
#
# Parts, most important first, each under its own time limit (seconds; NAME_LIMIT overrides) and all
# within TOTAL_LIMIT (480 s): a part starts only with 20 s left and gets at most what is left, so
# one slow or broken part leaves the others' results, and each writes its CSV as it goes.
#   checks            75  every Triton kernel against the PyTorch reference (and fla's same-math rows)
#   kernels          170  timings at L = 4096, 1024, 16384, 65536, 256 (batch x L = 65,536 tokens),
#                         head dims 64 and 128: vs fla and vs the memory floor (copy bandwidth)
#   models_targets   120  eval at 224 and 896 px: ViT-S (peer), DeiT-S, ViR-S, LightNet-S, Vim-S, VMamba-T
#   vim_tiny          40  eval at 1248 px: DeiT-Ti (peer), Vim-Ti (batches from 64: no smaller cell
#                         to estimate from, and 64 x 6,084 tokens already fill the GPU's cores)
#   models_eval       40  eval at 512 and 1248 px, the same models (what fits)
#   models_train      35  train steps at 224, 512, 896 and 1248 px, the same models (what fits)
#   launch_options    30  the launch options chosen from compiler reports (kernels_compile.py) against
#                         those they replaced, side by side (kernels_gpu.py --launch-options); runs
#                         only in the time the parts above left
#   digits             0  seqvision bench digits (issue 18's comparison; DIGITS_LIMIT=230 to run it)
# PARTS="models_eval models_train" runs only those (e.g. on a second lease). Batches fill the card: each
# cell the largest power of two up to FILL (256) whose memory (90 % of the card) and call time (at most
# MAX_CALL_S = 1 s), estimated from the model's smaller cells, fit; halved on out-of-memory; median of
# 3 calls after 2 warm-ups. Logs and result folders go to $OUT, packed into $OUT/results.tar.gz at
# the end. DRY_RUN=1 only prints each part's limit and command (tests/test_benchmarks.py parses them).
set -u
OUT=${OUT:-benchmarks/out/gpu}
TOTAL_LIMIT=${TOTAL_LIMIT:-480}
PARTS=${PARTS:-checks kernels models_targets vim_tiny models_eval models_train launch_options digits}
FILL=${FILL:-256}
MAX_CALL_S=${MAX_CALL_S:-1.0}
FILL_TINY=${FILL_TINY:-64}
DIGITS_STEPS=${DIGITS_STEPS:-1000}
DIGITS_BATCH=${DIGITS_BATCH:-64}
DRY_RUN=${DRY_RUN:-0}
export PYTHONUNBUFFERED=1
begin=$SECONDS

missing=()
[ "$DRY_RUN" = 1 ] || mkdir -p "$OUT"
for wheel in .whl/*.whl; do
    [ "$DRY_RUN" = 1 ] && break
    [ -e "$wheel" ] || continue
    name=$(basename "$wheel")
    module=${name%%-*}
    [ "$module" = fla_core ] && module=fla
    python3 -c "import $module" 2>/dev/null || missing+=("$wheel")
done
if [ ${#missing[@]} -gt 0 ]; then
    echo "installing into /tmp/site: ${missing[*]}"
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "${missing[@]}"
    export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}

part() {  # part NAME SECONDS COMMAND...: run COMMAND under a limit, log to $OUT/NAME.log, print its tail
    local name=$1 limit=$2 start=$SECONDS
    shift 2
    case " $PARTS " in *" $name "*) ;; *) return ;; esac
    local override="${name^^}_LIMIT"
    limit=${!override:-$limit}
    local left=$((TOTAL_LIMIT - (SECONDS - begin)))
    [ "$limit" -gt "$left" ] && limit=$left
    if [ "$limit" -lt 20 ]; then
        echo "=== $name: skipped (limit ${limit} s; $left s left of TOTAL_LIMIT)"
        return
    fi
    if [ "$DRY_RUN" = 1 ]; then
        printf '%s %s' "$name" "$limit"
        printf ' %q' "$@"
        printf '\n'
        return
    fi
    echo "=== $name (limit ${limit} s): $*"
    timeout -k 10 "$limit" "$@" >"$OUT/$name.log" 2>&1
    echo "=== $name: exit $? after $((SECONDS - start)) s"
    tail -n "${TAIL:-30}" "$OUT/$name.log"
}

if [ "$DRY_RUN" != 1 ]; then
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv
    python3 -c "import torch, triton, timm; print('torch', torch.__version__, 'triton', triton.__version__, 'timm', timm.__version__)"
    python3 -c "import fla; print('fla', fla.__version__)" || echo "fla does not import: its peer columns say so"
fi

kernels=(python3 benchmarks/kernels_gpu.py)
TAIL=12 part checks 75 "${kernels[@]}" --check-only --out "$OUT/kernels"
TAIL=60 part kernels 170 "${kernels[@]}" --no-check --lengths 4096 1024 16384 65536 256 --head-dims 64 128 \
    --out "$OUT/kernels"

models=(python3 -m seqvision bench models --device cuda --no-flops --repeats 3 --max-call-seconds "$MAX_CALL_S")
small=vir_small_patch16_224,lightnet_small_patch16_224,deit_small_patch16_224,vim_small_patch16_224,vmamba_tiny_224
TAIL=40 part models_targets 120 "${models[@]}" --fill-batch "$FILL" --models "$small" \
    --peer vit_small_patch16_224 --sizes 224,896 --modes eval --out "$OUT/models_targets"
TAIL=20 part vim_tiny 40 "${models[@]}" --fill-batch "$FILL_TINY" --models vim_tiny_patch16_224 \
    --peer deit_tiny_patch16_224 --sizes 1248 --modes eval --out "$OUT/vim_tiny"
TAIL=40 part models_eval 40 "${models[@]}" --fill-batch "$FILL" --models "$small" \
    --peer vit_small_patch16_224 --sizes 512,1248 --modes eval --out "$OUT/models_eval"
TAIL=60 part models_train 35 "${models[@]}" --fill-batch "$FILL" --models "$small" \
    --peer vit_small_patch16_224 --sizes 224,512,896,1248 --modes train --out "$OUT/models_train"

# Runs in what the parts above left (each stops early when done); PARTS=launch_options on a second call.
TAIL=12 part launch_options 30 "${kernels[@]}" --launch-options --out "$OUT/kernels"

digits=(python3 -m seqvision bench digits --steps "$DIGITS_STEPS" --batch-size "$DIGITS_BATCH")
TAIL=20 part digits "${DIGITS_LIMIT:-0}" "${digits[@]}" --jobs 8 --out "$OUT/digits"

[ "$DRY_RUN" = 1 ] && exit 0
tar czf "$OUT/results.tar.gz" -C "$OUT" --exclude results.tar.gz .
ls -la "$OUT"
echo "total $((SECONDS - begin)) s"
