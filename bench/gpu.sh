#!/usr/bin/env bash
# GPU training throughput of EfficientNetV2 S / L / XL, ours against timm, at every progressive-stage size:
# bf16 autocast, channels_last, torch.compile off and on, one GPU, plain PyTorch loop (bench/gpu_bench.py).
# Also the weight-layout cost: our model as trained (contiguous parameters, NHWC activations) against the same
# model with channels_last parameters (impl ours-nhwc-weights; S and XL, first and last stage size, eager).
#
#   bash bench/gpu.sh                      # from the repository root or anywhere; results in $OUT
#   OUT=/tmp/gpu bash bench/gpu.sh --budget 300 --compile-models s
#
# Needs: python3 with torch (CUDA) and timm; omegaconf (pipeline.config). No DeepSpeed, no data, no internet.
# Where omegaconf is missing and cannot be installed, put its wheel (pure Python, needs only PyYAML) in .whl/
# beside this repository's root; it is installed into a private folder for this run only:
#   python3 -m pip download --no-deps --only-binary=:all: -d .whl omegaconf
# Results: $OUT/gpu_bench.md (table), $OUT/gpu_bench.json, $OUT/gpu_bench.log, $OUT/nvidia-smi.txt.
# Every case has its own timeout and the whole plan a budget (--budget, default 450 s), so the run ends in
# about 8 minutes whatever happens; TOTAL_TIMEOUT (default 540 s) is the last guard.
set -euo pipefail

cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
OUT="${OUT:-bench/results/gpu}"
mkdir -p "$OUT"

if ! "$PY" -c "import omegaconf" 2>/dev/null; then
    if compgen -G ".whl/omegaconf-*.whl" >/dev/null; then
        site="$(mktemp -d /tmp/gpu_bench_site.XXXXXX)"
        "$PY" -m pip install -q --no-index --no-deps --no-compile --target "$site" .whl/omegaconf-*.whl
        export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
    else
        echo "error: python module omegaconf is missing (pipeline.config needs it). pip install omegaconf, or put" \
             "its wheel in .whl/ (python3 -m pip download --no-deps --only-binary=:all: -d .whl omegaconf)" >&2
        exit 2
    fi
fi

export PYTHONPATH=".${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1 || true
set -o pipefail
timeout "${TOTAL_TIMEOUT:-540}" "$PY" -u bench/gpu_bench.py --out "$OUT" "$@" 2>&1 | tee "$OUT/gpu_bench.log"
