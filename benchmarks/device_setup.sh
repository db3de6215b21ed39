# Source at the start of a device-tool call (docs/perf.md): installs the carried wheels, puts the repo on the
# path, keeps NVLink multicast off and builds the GPU mix from the carried shards.
#   carry: .whl (see docs/install.md, "Device tool") and runs/gpu (from configs/data/gpu_mix.yaml)
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || return 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 PATH=/tmp/site/bin:$PATH
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export TRITON_CACHE_DIR=/tmp/triton-cache  # tar it into $OUT to carry fla's autotuning to the next call
python3 -c "import torch, triton, fla, deepspeed, megatron.core; print(torch.__version__, triton.__version__, \
fla.__version__, deepspeed.__version__, torch.cuda.get_device_name(), torch.cuda.device_count())"
python3 -m data_tools.mix configs/data/gpu_mix.yaml || return 1
