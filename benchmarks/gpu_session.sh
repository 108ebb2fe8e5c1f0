#!/usr/bin/env bash
# Everything a session lent a GPU should run for fastguide, in parts that each fit one 10-minute device command.
#
# Prepare here (with network), once: the device image has torch, triton, onnxruntime, safetensors, sklearn...
# but not diffusers (the bench's diffusers-style baseline and the DiT-XL/2-shaped network need it):
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux2014_x86_64 -d .whl diffusers==0.42.1 importlib_metadata starlette uvicorn h11 click anyio idna sniffio typing_extensions
# Then, on the device (carry [".whl"]), one part per command, in this order (results land in $OUT):
#   bash benchmarks/gpu_session.sh tests      # the CUDA tests: kernel vs reference, graph replay == eager
#   bash benchmarks/gpu_session.sh kernel     # fused-kernel roofline table -> $OUT/RESULTS.md
#   bash benchmarks/gpu_session.sh dit 8      # DiT-XL/2 shape, fp16, NFE 4/8/16 at batch 8 (one batch per command)
#   bash benchmarks/gpu_session.sh dit 64
#   bash benchmarks/gpu_session.sh dit 1
#   bash benchmarks/gpu_session.sh digits     # the digits UNet, batch 1/8/64
#   bash benchmarks/gpu_session.sh dit-dpm 8  # DiT-XL/2, NFE 8, DPM-Solver++ 2M and UniPC vs diffusers' own schedulers
#   bash benchmarks/gpu_session.sh overhead   # per-step overhead of CFG, rescale, CFG-Zero*, APG vs diffusers' guiders
#   bash benchmarks/gpu_session.sh serve      # the load test of `fastguide serve` on the GPU (2000 requests, mixed NFE)
#   bash benchmarks/gpu_session.sh pipelines  # real-size SDXL / SD3-medium denoising loops, batch 1 then 4 (below)
# (the kernel part's table includes the multistep steps: cfg-dpm2m reads 1 history slot and writes 1, cfg-unipc3
# reads 4 and writes 2; and the reduction rules cfg-rescale, cfg-zero-star, apg: the moments pre-pass + the step)
# Untimed estimate: each dit part compiles DiT-XL/2 about six times (inductor, max-autotune for the floor); if a
# part runs into the limit, drop --nfe 4 / --nfe 16 (the goals are at NFE 8) or split the modes over two commands.
# Untimed estimate, pipelines part (benchmarks/pipelines_gpu.py: random-weight SDXL base UNet and SD3-medium MMDiT,
# fp16, 25 / 28 steps, CFG; 5 modes, --reps 3): cold inductor compiles dominate, about 1-1.5 min each for the SDXL
# UNet and less for SD3, two or three per point (the compiled denoiser, fastguide's step; the graph mode's step
# mostly from inductor's cache), plus ~40 s of timed calls per batch-1 point and ~4x that at batch 4. So one
# command should finish the three batch-1 points (SDXL Euler, SD3, SDXL DPM++ 2M) and perhaps one batch-4 point:
# --budget-s 420 starts no point after 7 minutes and `timeout 530` ends the script inside the 10-minute command;
# the JSON is rewritten after every point and lists what it did not reach under "skipped". If batch 4 is missed,
# `bash benchmarks/gpu_session.sh pipelines 4` in a second command runs it alone ($OUT/pipelines-gpu-b4.json).
# Back here: python benchmarks/report_sampler.py <the bench-cuda-*.json files> --write, and copy the kernel
# section of $OUT/RESULTS.md into benchmarks/RESULTS.md.
set -euo pipefail
OUT=${OUT:-/tmp/fastguide-gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if [ -d .whl ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
python3 -m pip install -q --no-deps --no-build-isolation --no-index -e . >/dev/null
python3 -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.cuda.get_device_name(), torch.__version__)"

case "${1:-}" in
tests)
    FASTGUIDE_TEST_CUDA=1 python3 -m pytest -q -x tests/kernels/test_guided_step.py tests/test_sampler_compile.py \
        tests/kernels/test_torch_step.py tests/test_sampler.py tests/test_loop.py tests/test_multistep.py \
        tests/kernels/test_guided_step_rules.py tests/test_guidance_rules.py tests/kernels/test_guided_step_rows.py \
        tests/test_row_plans.py 2>&1 | tee "$OUT/tests-cuda.log"
    ;;
kernel)
    python3 benchmarks/report_guided_step.py --write 2>&1 | tee "$OUT/kernel.log"
    cp benchmarks/RESULTS.md "$OUT/RESULTS.md"
    ;;
dit)
    batch=${2:?usage: gpu_session.sh dit BATCH}
    python3 -m fastguide.cli bench --model dit --batch "$batch" --nfe 4 --nfe 8 --nfe 16 --reps 7 \
        --mode diffusers_eager --mode diffusers_compiled --mode fastguide_compiled --mode fastguide_graph \
        --mode fastguide_recfg --mode fastguide_interval --mode floor \
        --json "$OUT/bench-cuda-dit-b$batch.json" 2>&1 | tee "$OUT/bench-dit-b$batch.log"
    ;;
dit-dpm)
    batch=${2:?usage: gpu_session.sh dit-dpm BATCH}
    python3 -m fastguide.cli bench --model dit --batch "$batch" --nfe 8 --reps 7 --solver dpm++2m --solver unipc \
        --mode diffusers_eager --mode diffusers_compiled --mode fastguide_compiled --mode fastguide_graph --mode floor \
        --json "$OUT/bench-cuda-dit-dpm-b$batch.json" 2>&1 | tee "$OUT/bench-dit-dpm-b$batch.log"
    ;;
overhead)
    python3 -m fastguide.cli bench --overhead --device cuda --batch 1 --batch 64 --reps 7 --rule cfg --rule cfg-rescale \
        --rule cfg-zero-star --rule apg --json "$OUT/overhead-cuda-rules.json" 2>&1 | tee "$OUT/overhead-rules.log"
    ;;
serve)
    python3 benchmarks/load_test.py --device cuda --out "$OUT/load-test-cuda.json" 2>&1 | tee "$OUT/load-test.log"
    ;;
pipelines)
    batches=${2:-1,4}
    name=pipelines-gpu${2:+-b${2//,/-}}
    timeout 530 python3 benchmarks/pipelines_gpu.py --batch "$batches" --reps 3 --budget-s 420 \
        --json "$OUT/$name.json" 2>&1 | tee "$OUT/$name.log" \
        || echo "pipelines: stopped early (the points finished are in $OUT/$name.json)" | tee -a "$OUT/$name.log"
    ;;
digits)
    python3 -m fastguide.cli bench --model digits --reps 7 --json "$OUT/bench-cuda-digits.json" 2>&1 \
        | tee "$OUT/bench-digits.log"
    ;;
*)
    echo "usage: bash benchmarks/gpu_session.sh" \
        "tests|kernel|dit BATCH|dit-dpm BATCH|digits|overhead|serve|pipelines [BATCHES]" >&2
    exit 2
    ;;
esac
