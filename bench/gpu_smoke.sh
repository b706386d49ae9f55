#!/usr/bin/env bash
# GPU readiness check: saelora on CUDA in bf16 against the same run on the CPU in fp32 (bench/gpu_smoke.py:
# a few LoRA steps around an fp32 SAE, eval, and the torch engine's latents compared with a CPU server's).
#
# The GPU machines this project borrows reach no package registry. Their image has a CUDA torch,
# transformers, peft and accelerate; everything else must travel with the working tree, at most 64 MiB in
# all, as wheels installed with `pip install --no-deps`. Two stages:
#
#   bash bench/gpu_smoke.sh pack    # here, with registry access: wheels into bench/gpu_wheels/, size checked
#   bash bench/gpu_smoke.sh run     # on the GPU machine: install the wheels, run the check, write
#                                   # bench/results/gpu_smoke.json (exit 0 = pass)
#
# bench/gpu_wheels/ is git-ignored: name it in the device tool's `carry`.
#
# What does not fit (measured 2026-11-30, docs/scaling.md): sae-lens imports transformer-lens at import
# time, which imports datasets (-> pyarrow, 53 MB wheel, and pandas, 12 MB) and wandb (20 MB). With
# saelora's own wheel (10 MB, the shipped demo SAE inside) that is ~100 MB: `pack` stops and says so unless
# the image already has those packages (SAELORA_GPU_HAVE lists distributions the image provides).
# vLLM cannot travel either: the vLLM-on-GPU path stays untested.
set -euo pipefail
cd "$(dirname "$0")/.."
WHEELS=bench/gpu_wheels
LIMIT_MB=60  # of the 64 MiB transfer: the working tree needs the rest

# sae-lens's import-time closure beyond torch/transformers/peft/accelerate, and the server's (found by
# importing saelora's modules in a venv that has only the image's packages).
CLOSURE="sae-lens transformer-lens einops better-abc jaxtyping wadler-lindig datasets multiprocess dill xxhash
pandas python-dateutil pyarrow requests urllib3 certifi charset-normalizer simple-parsing docstring-parser
wandb platformdirs protobuf fastapi starlette uvicorn httpx httpcore prometheus-client gguf"

pack() {
  rm -rf "$WHEELS" && mkdir -p "$WHEELS"
  local py=.venv/bin/python
  "$py" -m pip wheel -q --no-deps --no-build-isolation -w "$WHEELS" . >/dev/null 2>&1
  local have=" ${SAELORA_GPU_HAVE:-} "
  for dist in $CLOSURE; do
    [[ "$have" == *" $dist "* ]] && continue
    local version
    version=$("$py" -m pip show "$dist" 2>/dev/null | awk '/^Version:/{print $2}')
    [ -n "$version" ] || { echo "gpu_smoke: $dist is not installed here; run make setup first" >&2; exit 2; }
    "$py" -m pip download -q --no-deps -d "$WHEELS" "$dist==$version" 2>/dev/null
  done
  local mb
  mb=$(du -sm "$WHEELS" | cut -f1)
  ls -S -s "$WHEELS" | head -8
  if [ "$mb" -gt "$LIMIT_MB" ]; then
    echo "gpu_smoke: the wheels take ${mb} MB, over the ${LIMIT_MB} MB this transfer allows. The largest above" \
         "are sae-lens's import-time dependencies; a GPU image that provides them (list them in" \
         "SAELORA_GPU_HAVE) or a registry is needed. See docs/scaling.md." >&2
    exit 3
  fi
  echo "gpu_smoke: ${mb} MB of wheels in $WHEELS; carry it to the GPU machine and run: bash bench/gpu_smoke.sh run"
}

run() {
  [ -d "$WHEELS" ] || { echo "gpu_smoke: no $WHEELS; run 'bash bench/gpu_smoke.sh pack' where a registry is" >&2; exit 2; }
  python -m venv --system-site-packages .gpu-venv  # the image's CUDA torch, transformers, peft, accelerate
  .gpu-venv/bin/python -m pip install -q --no-deps --no-index "$WHEELS"/*.whl
  .gpu-venv/bin/python -c "import torch, sae_lens, saelora.serve.api.app; assert torch.cuda.is_available()"
  .gpu-venv/bin/python bench/gpu_smoke.py --device cuda "$@"
}

case "${1:-}" in
  pack) pack ;;
  run) shift; run "$@" ;;
  *) echo "usage: bash bench/gpu_smoke.sh pack|run [gpu_smoke.py options]" >&2; exit 2 ;;
esac
