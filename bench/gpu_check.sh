#!/usr/bin/env bash
# fastseq: the first GPU check, one command (H100/H200 image: python3 = torch 2.11 + Triton 3.6,
# no package index). From the repository root on the device machine:
#
#     bash bench/gpu_check.sh                 # writes everything under $OUT (default ./gpu_out)
#
# Without a CUDA device, or with GPU_CHECK_DRY=1, every stage runs on the CPU at tiny sizes
# (plumbing only; tests/test_gpu_check.py runs it so in CI, ~1-3 min on 2 cores).
#
# Stages (each capped by `timeout`, the whole run by BUDGET_S: 460 s on a GPU, 170 s dry;
# predicted GPU times in brackets, from bench/NOTES.md v0.4):
#   env        versions, device properties, nvidia-smi, TF32 defaults, Triton's ptxas     [~10 s]
#   install    pip install --no-index --no-deps --no-build-isolation -e .
#              (dry: --target a temp folder, so no installed fastseq changes)            [~10 s]
#   flashrnn   only with a carried .whl/flashrnn-*.whl: installed into a temp folder     [~5 s]
#   ext        the C++/CUDA extension (FASTSEQ_CACHE in a temp folder on a GPU; dry: the
#              usual cache); the .so goes to fastseq/_C_gpucheck.so, which the loader
#              prefers, so no later process rebuilds; removed at exit. On a GPU it builds
#              in the background, beside the kernels stage                              [~60-120 s]
#   kernels    python -m fastseq.bench.kernels: every launched kernel specialisation,
#              compiled on the stub driver (parallel workers), then launched on the GPU;
#              registers, spills, shared memory -> kernels.json                          [~40-90 s]
#   test_gpu   tests/test_gpu.py -> junit_gpu.xml                                        [~60-90 s]
#   test_persistent  tests/test_gpu.py -m persistent_kernels (the persistent CUDA kernels against
#              the per-step path; left out of test_gpu), pass/fail in run.log            [~20-40 s]
#   bench_sync fastseq bench --suite sync: the persistent step's grid barrier and state exchange
#              alone (grid barrier, arrival flags, tagged words; 48-132 blocks; 16 B to
#              96 KB per step), the step model's largest assumed term, in its own process [~15-30 s]
#   parity     test_rnn_parity, test_ops_triton, test_attention_ops, test_decoder_step,
#              test_attention_triton, test_ops_triton_sequence (not slow)
#              on CUDA, float32 and bfloat16 (xdist when present) -> junit_parity.xml    [~60-120 s]
#   parity_notf32  only if a float32 layer parity test failed: test_rnn_parity again with
#              cuDNN/cuBLAS TF32 off (a pytest plugin), to tell TF32 from a kernel bug   [~30 s]
#   bench      fastseq bench --quick --device cuda --suite layer host                    [~90-150 s]
#   bench_persistent  only if test_persistent passed: the layer suite's persistent CUDA
#              kernels (FASTSEQ_BENCH_PERSISTENT=only: dense cases, next to cuDNN in the
#              same rounds), in its own process like test_persistent                    [~30-60 s]
#   test_tagged  tests/test_gpu.py -m tagged_exchange: the tensor-core forward without a grid
#              barrier against the per-step path (a hang costs only this stage)           [~10-20 s]
#   bench_step the same for cell attention decoder_step                                 [~30-60 s]
#   bench_more the same for train_step decode lm, if time is left; the four runs'
#              results merged -> bench.json, bench.md                                    [~30-60 s]
#   summary    summary.json (always: trap EXIT)
#
# $OUT (at most 8 files): summary.json, run.log, kernels.json, junit_gpu.xml, junit_parity.xml,
# bench.json, bench.md, env.json. The checkout is not modified, except fastseq/_C_gpucheck.so
# while the check runs.
set -u
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$REPO"
OUT=${OUT:-$REPO/gpu_out}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
PY=${PY:-python3}
W=$(mktemp -d "${TMPDIR:-/tmp}/fastseq-gpucheck.XXXXXX")
HELPER="$REPO/bench/gpu_check.py"
START=$(date +%s)
echo "$START" > "$W/start"
SO="$REPO/fastseq/_C_gpucheck.so"
STAGES="$W/stages.tsv"; : > "$STAGES"
MODE=unknown
EXT_PID=
exec > >(tee -a "$OUT/run.log") 2>&1
TEE_PID=$!

unset TRITON_INTERPRET
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}" PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1
export PIP_NO_INDEX=1 PIP_DISABLE_PIP_VERSION_CHECK=1 TRITON_DEFAULT_FP_FUSION=${TRITON_DEFAULT_FP_FUSION:-1}
export FASTSEQ_STUB_CUDA_DIR="$W/stub-cuda"

finish() {
  trap - EXIT INT TERM
  if [ -n "${EXT_PID:-}" ]; then pkill -TERM -P "$EXT_PID" 2>/dev/null; kill "$EXT_PID" 2>/dev/null; fi
  echo "== summary at +$(( $(date +%s) - START ))s"
  cp -f "$W/env.json" "$OUT/env.json" 2>/dev/null
  $PY "$HELPER" summary "$W" "$OUT" || echo "!! summary failed"
  rm -f "$SO"
  [ "${GPU_CHECK_KEEP:-0}" = 1 ] || rm -rf "$W"
  echo "== done at +$(( $(date +%s) - START ))s ($MODE)"
  exec >&- 2>&-
  wait "$TEE_PID" 2>/dev/null  # run.log complete before the command returns
}
trap finish EXIT
trap 'exit 130' INT TERM

HAVE_GPU=$($PY -c "import torch; print(int(torch.cuda.is_available()))" 2>/dev/null || echo 0)
if [ "${GPU_CHECK_DRY:-0}" = 1 ] || [ "$HAVE_GPU" != 1 ]; then
  MODE=dry
  BUDGET_S=${BUDGET_S:-175}
  echo "!! DRY run (GPU_CHECK_DRY=${GPU_CHECK_DRY:-0}, CUDA device: $HAVE_GPU): CPU, tiny sizes, plumbing only"
  if $PY -c "import torch, sys; sys.exit(0 if torch.version.cuda else 1)" 2>/dev/null; then
    export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}  # a CUDA torch without a device cannot probe the arch
  fi
else
  MODE=gpu
  BUDGET_S=${BUDGET_S:-460}  # the device tool's run: timeout_s <= 500 (the standing order)
  export FASTSEQ_CACHE="$W/ext" MAX_JOBS=${MAX_JOBS:-$(nproc)}
fi
export GPU_CHECK_MODE=$MODE BUDGET_S
NPROC=$(nproc)

left() { echo $(( BUDGET_S - ($(date +%s) - START) )); }
# stage NAME MAX_S CMD...: run CMD with timeout min(MAX_S, budget left - 20 s); its output goes to
# the log and to $W/NAME.log; NAME, rc, ms and the timeout are appended to $STAGES.
stage() {
  local name=$1 max=$2; shift 2
  local l t
  l=$(left); t=$(( max < l - 20 ? max : l - 20 ))
  if [ "$t" -le 5 ]; then
    echo "== SKIP $name (budget: ${l}s left)"; printf '%s\tskipped\t0\t0\n' "$name" >> "$STAGES"; return 0
  fi
  echo "== $name (timeout ${t}s) at +$(( $(date +%s) - START ))s"
  local s rc
  s=$(date +%s%N)
  timeout -k 10 "$t" "$@" > >(tee "$W/$name.log") 2>&1; rc=$?
  local ms=$(( ($(date +%s%N) - s) / 1000000 ))
  printf '%s\t%s\t%s\t%s\n' "$name" "$rc" "$ms" "$t" >> "$STAGES"
  echo "== $name rc=$rc ${ms}ms"
  return 0
}
skip() { echo "== SKIP $1 ($2)"; printf '%s\tskipped\t0\t0\n' "$1" >> "$STAGES"; }


# ------------------------------------------------------------------ env, install
stage env 40 $PY "$HELPER" env "$W/env.json"

if [ "$MODE" = gpu ]; then
  stage install 90 $PY -m pip install --no-index --no-deps --no-build-isolation -e .
else  # never touch an installed fastseq here: install into a folder that nothing imports
  stage install 60 $PY -m pip install -q --no-index --no-deps --no-build-isolation -e . --target "$W/site"
fi

WHL=$(ls "$REPO"/.whl/flashrnn-*.whl 2>/dev/null | head -1)
if [ "$MODE" = gpu ] && [ -n "$WHL" ]; then
  stage flashrnn 60 $PY -m pip install -q --no-index --no-deps --no-compile --target "$W/flashrnn" "$WHL"
  export PYTHONPATH="$PYTHONPATH:$W/flashrnn" FASTSEQ_FLASHRNN_BUDGET_S=${FASTSEQ_FLASHRNN_BUDGET_S:-120}
else
  skip flashrnn "no CUDA device or no .whl/flashrnn-*.whl"
fi

# ------------------------------------------------------------------ ext (background) and kernels
cat > "$W/ext.py" <<'EOF'
import json, sys, time
t = time.time()
from fastseq.backend import extension
ok, why = extension.status()
r = {"ok": ok, "reason": why[:2000], "build_s": round(time.time() - t, 1), "csrc": str(extension.csrc_dir())}
if ok:
    r["has_cuda"] = extension.has_cuda()
    r["so"] = str(extension.build_dir() / "fastseq_cpp.so")
json.dump(r, open(sys.argv[1], "w"), indent=1)
print(json.dumps(r))
EOF
cat > "$W/ext.sh" <<'EOF'
$PY "$W/ext.py" "$W/ext.json" || exit 1
so=$($PY -c "import json; r = json.load(open('$W/ext.json')); print(r.get('so') or '')")
if [ -n "$so" ] && [ -f "$so" ]; then
  cp "$so" "$SO.tmp" && mv "$SO.tmp" "$SO" && echo "extension: $so -> $SO"
  exit 0
fi
exit 1
EOF
rm -f "$SO"
if [ "$MODE" = gpu ]; then  # the build (nvcc, MAX_JOBS) beside the kernel compiles: 16 cores
  ( stage ext 240 env PY="$PY" W="$W" SO="$SO" bash "$W/ext.sh" ) &
  EXT_PID=$!
  J=$(( NPROC > 4 ? NPROC - 4 : 1 )); J=$(( J > 12 ? 12 : J ))  # leave cores to the extension build
  stage kernels 180 $PY "$HELPER" run "$REPO" fastseq.bench.kernels --grid full --jobs "$J" --timeout 130 \
    --out "$OUT/kernels.json"
  wait "$EXT_PID"; EXT_PID=
else  # 2 cores: one after the other (the build is cached by the test suite's own, usually)
  stage ext 150 env PY="$PY" W="$W" SO="$SO" bash "$W/ext.sh"
  stage kernels 60 $PY "$HELPER" run "$REPO" fastseq.bench.kernels --grid tiny --mode stub --jobs 1 --timeout 50 \
    --out "$OUT/kernels.json"
fi
if [ ! -f "$SO" ]; then
  echo "!! no extension library: later processes fail its build at once (CXX=/bin/false) instead of rebuilding"
  export CXX=/bin/false
fi

# ------------------------------------------------------------------ tests
PYT="$PY -m pytest -q -p no:cacheprovider -rfE --durations=10"
if $PY -c "import pytest_timeout" 2>/dev/null; then PYT="$PYT --timeout=240"; fi
XD=""
if $PY -c "import xdist" 2>/dev/null; then XD="-n $(( NPROC < 8 ? NPROC : 8 ))"; fi

if [ "$MODE" = gpu ]; then
  stage test_gpu 150 $PYT tests/test_gpu.py -m "not persistent_kernels and not tagged_exchange" \
    --junitxml="$OUT/junit_gpu.xml"
  # The persistent CUDA kernels, never run before, in a process of their own (a hang or a fault
  # ends only this stage); pass/fail in run.log.
  stage test_persistent 75 $PYT tests/test_gpu.py -m persistent_kernels --junitxml="$W/junit_persistent.xml"
  # The barrier and the exchange alone (bench/NOTES.md v0.15), before anything long: never timed yet.
  stage bench_sync 45 $PY "$HELPER" run "$REPO" fastseq bench --quick --device cuda --suite sync --dtype float32 \
    --out "$W/bench" --tag gpucheck-0
  stage parity 180 $PYT $XD tests/test_rnn_parity.py tests/test_ops_triton.py tests/test_attention_ops.py \
    tests/test_decoder_step.py tests/test_attention_triton.py tests/test_ops_triton_sequence.py \
    -m "not slow" --junitxml="$OUT/junit_parity.xml"
else  # test_gpu skips itself without a device; the parity subset on the CPU backends, small cases
  stage test_gpu 60 $PYT tests/test_gpu.py -m "not persistent_kernels and not tagged_exchange" \
    --junitxml="$OUT/junit_gpu.xml"
  skip test_persistent "the persistent kernels need a CUDA device (dry)"
  skip bench_sync "the sync probe needs a CUDA device (dry)"
  stage parity 60 $PYT tests/test_rnn_parity.py -k "(reference or cpp) and (test_cell_matches_torch or L1-biFalse-bfFalse-B3)" \
    --junitxml="$OUT/junit_parity.xml"
fi

# A float32 parity failure against cuDNN: run test_rnn_parity again with TF32 off everywhere.
if [ "$MODE" = gpu ] && $PY "$HELPER" junit-failed "$OUT/junit_parity.xml" test_rnn_parity; then
  mkdir -p "$W/plugins"
  printf 'import torch\ntorch.backends.cudnn.allow_tf32 = False\ntorch.backends.cuda.matmul.allow_tf32 = False\n' \
    > "$W/plugins/fs_notf32.py"
  stage parity_notf32 90 env PYTHONPATH="$W/plugins:$PYTHONPATH" $PYT $XD -p fs_notf32 tests/test_rnn_parity.py \
    --junitxml="$W/junit_parity_notf32.xml"
else
  skip parity_notf32 "no float32 parity failure to explain (or dry)"
fi

# ------------------------------------------------------------------ bench
if [ "$MODE" = gpu ]; then
  BENCH="bench --quick --device cuda"
else
  BENCH="bench --grid tiny --device cpu"
fi
# Three invocations, so that a suite which runs past the budget loses only its own results.
stage bench 200 $PY "$HELPER" run "$REPO" fastseq $BENCH --suite layer host --out "$W/bench" --tag gpucheck-1
# The persistent CUDA kernels against cuDNN (issue 17's comparison), in its own process, only if
# their test passed.
if [ "$MODE" = gpu ]; then
  if [ "$(awk -F'\t' '$1 == "test_persistent" {print $2}' "$STAGES")" = 0 ]; then
    stage bench_persistent 90 env FASTSEQ_BENCH_PERSISTENT=only $PY "$HELPER" run "$REPO" fastseq $BENCH \
      --suite layer --out "$W/bench" --tag gpucheck-4
  else
    skip bench_persistent "test_persistent did not pass"
  fi
else
  skip bench_persistent "the persistent kernels need a CUDA device (dry)"
fi
# The tensor-core forward without a grid barrier (FASTSEQ_CUDA_PERSISTENT_SYNC=tagged), never run on
# hardware: after the persistent benchmarks, so that a hang costs only this stage; pass/fail in run.log.
if [ "$MODE" = gpu ]; then
  stage test_tagged 40 $PYT tests/test_gpu.py -m tagged_exchange --junitxml="$W/junit_tagged.xml"
else
  skip test_tagged "the tagged exchange needs a CUDA device (dry)"
fi
stage bench_step 150 $PY "$HELPER" run "$REPO" fastseq $BENCH --suite cell attention decoder_step --out "$W/bench" \
  --tag gpucheck-2
stage bench_more 120 $PY "$HELPER" run "$REPO" fastseq $BENCH --suite train_step decode lm --out "$W/bench" \
  --tag gpucheck-3
$PY "$HELPER" merge-bench "$REPO" "$OUT" "$W"/bench/*.json || echo "!! merge-bench failed"
exit 0
