# Sourced by the launch scripts: without a working NVIDIA GPU, DeepSpeed runs on its CPU accelerator.
if ! command -v nvidia-smi >/dev/null 2>&1 || ! nvidia-smi -L >/dev/null 2>&1; then
    export DS_ACCELERATOR=cpu
fi
