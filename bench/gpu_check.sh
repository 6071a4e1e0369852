#!/usr/bin/env bash
# The GPU checks in one call, from the repository root on a machine with a CUDA GPU:
#
#     bash bench/gpu_check.sh [OUT_DIR]          # about 8 minutes on an H200
#
# 1. parity on the GPU: the extraction tests compare GPU features with a float32 forward pass on the
#    CPU, and the probe tests run their heads there (the probes' device "auto" is the GPU);
# 2. bench/probe.py with the sweep on the GPU against scikit-learn on the CPU;
# 3. bench/extract.py with ADM-256-sized random weights (bf16, then fp32), and 1 process
#    against 2 sharing the GPU (bench/extract.py --nproc 2) and the store's objects with and without shards.
# 4. the model kinds' parity tests on the GPU, and bench/extract.py --model-kind sd --full: SD-2.1-sized
#    random weights (768 px) at bf16, VAE encoding timed separately (transformers and timm needed).
# 5. today's models (issue 22): their parity tests on the GPU, then bench/extract.py --model-kind flux --full and
#    --model-kind sd3 --full: FLUX.1-dev-sized (11.9B) and SD3-medium-sized (2.0B) random weights at 1024 px in bf16,
#    built on the GPU (never written to disk), with the peak GPU memory beside the --dry-run estimate.
#    Then Sana's parity tests on the GPU and bench/extract.py --model-kind sana --full: Sana-1600M-sized (1.6B)
#    random weights at 1024 px in bf16. Prepared, not yet run on a GPU (about 9 more minutes, estimated).
#    `bash bench/gpu_check.sh OUT transformers` runs section 5 alone.
# 6. bench/decode.py --device cuda: the CPU decode paths and torchvision's batched decode_jpeg on the GPU.
# Where diffusers, zarr, numcodecs, dask or mlxtend are missing (the lent device machines), put their
# wheels in .whl/ first; they are installed into /tmp/site.
set -u
out=${1:-${OUT:-gpu-check}}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore
if [ -d .whl ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        || exit 1
    export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
export PYTHONPATH=.:${PYTHONPATH:-}
nvidia-smi -L
transformers_check() {
    timeout 240 python3 -m pytest -q -p no:cacheprovider tests/test_transformer_models.py \
        2>&1 | tail -15 | tee "$out/pytest_transformers_gpu.txt"
    timeout 360 python3 bench/extract.py --device cuda --model-kind flux --full --images 32 --timesteps 250,750 \
        --batch-size 16 --repeats 1 2>&1 | grep -v Warn | tail -16 | tee "$out/extract_flux_dev.txt"
    timeout 240 python3 bench/extract.py --device cuda --model-kind sd3 --full --images 64 --timesteps 250,750 \
        --batch-size 32 --repeats 1 2>&1 | grep -v Warn | tail -16 | tee "$out/extract_sd3_medium.txt"
    # Sana: parity on the GPU (and --offload none running Gemma-2 there: the same features within float32
    # rounding), then Sana-1600M-sized random weights at 1024 px in bf16 beside the --dry-run estimate
    timeout 300 python3 -m pytest -q -p no:cacheprovider tests/test_sana.py \
        2>&1 | tail -15 | tee "$out/pytest_sana_gpu.txt"
    timeout 240 python3 bench/extract.py --device cuda --model-kind sana --full --images 64 --timesteps 250,750 \
        --batch-size 64 --repeats 1 2>&1 | grep -v Warn | tail -16 | tee "$out/extract_sana_1600m.txt"
}
if [ "${2:-}" = transformers ]; then
    transformers_check
    exit 0
fi
timeout 150 python3 -m pytest -q -p no:cacheprovider tests/test_extract.py tests/test_probe.py tests/test_probe_heads.py \
    2>&1 | tail -15 | tee "$out/pytest_gpu.txt"
timeout 120 python3 bench/probe.py --device cuda --threads 1 --workdir /tmp/bench-probe 2>&1 | grep -v Warn \
    | tee "$out/probe_cuda.txt"
timeout 300 python3 bench/extract.py --device cuda --adm256 --images 128 --repeats 1 2>&1 | grep -v Warn | tail -4 \
    | tee "$out/extract_adm256.txt"
timeout 150 python3 -m pytest -q -p no:cacheprovider tests/test_latent_models.py tests/test_backbones.py \
    2>&1 | tail -15 | tee "$out/pytest_kinds_gpu.txt"
timeout 240 python3 bench/extract.py --device cuda --model-kind sd --full --images 64 --timesteps 100,261 --repeats 1 \
    2>&1 | grep -v Warn | tail -5 | tee "$out/extract_sd21.txt"
timeout 200 python3 bench/extract.py --device cuda --nproc 2 --images 512 --timesteps 10,90,150 2>&1 | grep -v Warn \
    | tail -6 | tee "$out/extract_nproc2.txt"
transformers_check
# 6. bench/decode.py: images/s per core of the CPU decode paths beside torchvision's batched decode_jpeg on the GPU
timeout 240 python3 bench/decode.py --device cuda --seconds 1 2>&1 | grep -v Warn | tee "$out/decode_cuda.txt"
