#!/usr/bin/env bash
# The GPU checks of the kernels (bf16 correctness, the GPU benchmark set) in one command, for a lent
# H100/H200 whose image has torch, triton, transformers, timm, accelerate and peft but not the rest of
# our requirements and no package registry.
#
#   bash benchmarks/gpu_session.sh wheels   # here, with the registry: the missing wheels into .whl/ (git-ignored)
#   bash benchmarks/gpu_session.sh          # there: install them and tpo, run the checks, results to $OUT
#
# With the device tool: run(command="bash benchmarks/gpu_session.sh", carry=[".whl"], timeout_s=560). Each step
# has its own time limit (GPU_TESTS_S, KERNELS_S, ATTENTION_S, DPO_S seconds; 0 skips a step) so that a slow
# step cannot take the others' time; everything is printed and kept in $OUT/session.log, and the results
# files the run wrote come back as $OUT/results.tgz: unpack it at the repository root (tar xzf results.tgz) and commit
# benchmarks/results/<the GPU's folder>/.
set -uo pipefail
cd "$(dirname "$0")/.."

WHEELS=(mmengine==0.10.7 addict==2.4.0 yapf==0.43.0 platformdirs==4.14.9 termcolor==3.3.0 open_clip_torch==3.3.0
        ftfy==6.3.1 wcwidth==0.9.4 pycocotools==2.0.11 liger-kernel==0.8.5)

if [ "${1:-}" = "wheels" ]; then
    grep -qx "/.whl/" .git/info/exclude 2>/dev/null || echo "/.whl/" >> .git/info/exclude
    python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl "${WHEELS[@]}"
    exit $?
fi

OUT=${OUT:-/tmp/gpu_session_out}
mkdir -p "$OUT"
exec > >(tee "$OUT/session.log") 2>&1
export PYTHONUNBUFFERED=1
GPU_TESTS_S=${GPU_TESTS_S:-150}
KERNELS_S=${KERNELS_S:-240}
ATTENTION_S=${ATTENTION_S:-90}
DPO_S=${DPO_S:-0}
start=$(date +%s)
step() { echo; echo "=== $1 (at $(( $(date +%s) - start )) s)"; }

step "install"
if [ -d .whl ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        || { echo "installing the carried wheels failed"; exit 1; }
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
else
    echo "no .whl/ here: run 'bash benchmarks/gpu_session.sh wheels' first and carry .whl"
fi
python3 -m pip install -q --no-index --no-deps --no-build-isolation --no-compile -e . \
    || { echo "installing tpo (pip install -e . without dependencies) failed"; exit 1; }
nvidia-smi -L
python3 - <<'EOF'
import torch, triton, transformers, timm
print(f"torch {torch.__version__} (CUDA {torch.version.cuda}), triton {triton.__version__}, "
      f"transformers {transformers.__version__}, timm {timm.__version__}")
print("GPU:", torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none")
import tpo.kernels, tpo.registry  # the package imports with the carried wheels
EOF

rc=0
if [ "$GPU_TESTS_S" -gt 0 ]; then
    step "GPU tests: bf16/fp16 Triton kernels against float64 references, large shapes (pytest -m gpu)"
    timeout "$GPU_TESTS_S" python3 -m pytest -m gpu -q -p no:cacheprovider tests/kernels || rc=1
fi
if [ "$KERNELS_S" -gt 0 ]; then
    step "kernel benchmarks, GPU set: fused log-probs and the fused DPO loss vs eager, Liger-Kernel and cuBLAS"
    timeout "$KERNELS_S" python3 benchmarks/run_kernel_benchmarks.py --device cuda --repeats 5 || rc=1
fi
if [ "$ATTENTION_S" -gt 0 ]; then
    step "task-token attention, GPU set: against SDPA with a mask, and the card's copy bandwidth"
    timeout "$ATTENTION_S" python3 -m pytest -q -p no:cacheprovider benchmarks/bench_task_token_attention.py \
        -m gpu --benchmark-enable --benchmark-min-rounds=5 || rc=1
fi
if [ "$DPO_S" -gt 0 ]; then
    step "DPO held-out ranking of the synthetic benchmark's pairs, longer than a CPU allows"
    timeout "$DPO_S" python3 benchmarks/bench_dpo_heldout.py --skip-colour --synth-seeds 0 --steps 3000 \
        --sft-steps 3000 --sft-tasks qa preference caption || rc=1
fi

step "results"
mapfile -t written < <(git ls-files --others --modified --exclude-standard benchmarks/results)
printf '%s\n' "${written[@]}"
[ "${#written[@]}" -gt 0 ] && tar czf "$OUT/results.tgz" "${written[@]}"
echo "done in $(( $(date +%s) - start )) s, rc=$rc"
exit $rc
