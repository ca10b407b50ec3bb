#!/usr/bin/env bash
# Issue 21's GPU rows: `sumie bench --compare diffusers` on CUDA, in one device call per model (docs/benchmarks.md).
#
#   bash scripts/gpu-bench.sh --wheels   here, once: the packages the device image lacks, into .whl/ (git-ignored)
#   bash scripts/gpu-bench.sh sd15       on the device (carry .whl): SD1.5 512², 20 steps, fp16 (3 pairs) and fp32
#   bash scripts/gpu-bench.sh sdxl       on the device (carry .whl): SDXL 1024², 20 steps, fp16 (2 pairs)
#
# Each model is a random-weight file in the real layout, written on the machine (`sumie bench --make-random`).
# Reports (--json) go to $OUT (the device tool's folder that comes back), else /tmp/gpu-bench; format one with
# `sumie bench --from-json FILE --markdown`. DEVICE, SIZE, STEPS and REPEAT override the defaults (DEVICE=cpu SIZE=64
# STEPS=1 REPEAT=1 is a smoke test of this script on a CPU).
set -euo pipefail
cd "$(dirname "$0")/.."

if [[ "${1:-}" == "--wheels" ]]; then
  grep -qxF '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
  # pure-Python wheels of the versions the tests use; torch, numpy, safetensors, tokenizers, Pillow and OpenCV are
  # in the device image already
  python3 -m pip download -q --no-deps --only-binary=:all: -d .whl \
    diffusers==0.42.1 transformers==5.23.0 huggingface_hub==2.4.0 accelerate==1.16.0 importlib_metadata==10.2.0 \
    zipp==4.1.2 ftfy==6.3.1 wcwidth==0.9.5 torchsde==0.2.6 trampoline==0.1.2
  ls .whl
  exit 0
fi

model=${1:?usage: gpu-bench.sh --wheels | sd15 | sdxl}
out=${OUT:-/tmp/gpu-bench}
mkdir -p "$out"
if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
device=${DEVICE:-cuda}
bench() { python3 -m sumie bench "$@"; }
python3 -c "import torch; print(torch.__version__, torch.cuda.is_available() and torch.cuda.get_device_name(0))"

case "$model" in
  sd15)
    file=/tmp/gpu-sd15.safetensors
    [[ -f $file ]] || bench --make-random sd15 -o "$file"
    for dtype in fp16 fp32; do
      repeat=${REPEAT:-$([[ $dtype == fp16 ]] && echo 3 || echo 1)}
      bench --compare diffusers "$file" --device "$device" --dtype "$dtype" --sizes "${SIZE:-512}" \
        --steps "${STEPS:-20}" --sampler euler --repeat "$repeat" --json > "$out/sd15-${SIZE:-512}-$dtype.json"
      bench --from-json "$out/sd15-${SIZE:-512}-$dtype.json"
    done
    ;;
  sdxl)
    file=/tmp/gpu-sdxl.safetensors
    [[ -f $file ]] || bench --make-random sdxl -o "$file"
    bench --compare diffusers "$file" --device "$device" --dtype fp16 --sizes "${SIZE:-1024}" --steps "${STEPS:-20}" \
      --sampler euler --repeat "${REPEAT:-2}" --json > "$out/sdxl-${SIZE:-1024}-fp16.json"
    bench --from-json "$out/sdxl-${SIZE:-1024}-fp16.json"
    ;;
  *)
    echo "gpu-bench.sh: unknown model '$model': give --wheels, sd15 or sdxl" >&2
    exit 2
    ;;
esac
