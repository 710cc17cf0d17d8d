#!/usr/bin/env bash
# The GPU measurements of issue 7, run on the device machine from the repository root, one stage per call
# (each fits the tool's 10-minute limit):
#   bash scripts/device_wheels.sh                                  # here, once: .whl/ for the device
#   run(command="bash scripts/gpu_measure.sh bench", carry=[".whl"])   # then: lora24, preset
# Results land in $OUT (they come back with the call); copy the json files into bench/results/ and the
# numbers into the README's performance table.
#   bench   editflow vs the diffusers-example step at real width (3072 wide, 4 + 8 blocks), 1024^2, batch 1
#   lora24  experiment=lora_24gb: the full-depth real-width transformer, LoRA + int8 base + checkpointing +
#           8-bit AdamW (torchao's, bitsandbytes is not carried), 1024^2, under a 24 GB memory cap
#   preset  a few steps of experiment=gpt_image_edit_8xa100 on one GPU: bf16, the recipe's FlashAttention
#           backend, DeepSpeed ZeRO-3 through accelerate, real-width transformer (random weights), tiny
#           Qwen/VAE and toy edits at 512^2 (no weights or data can be fetched there)
set -uo pipefail
stage=${1:?usage: gpu_measure.sh bench|lora24|preset}
out=${OUT:-bench/results}
mkdir -p "$out"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || exit 1
export PYTHONPATH=/tmp/site:$PWD HF_HUB_OFFLINE=1 WANDB_MODE=disabled PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
day=$(date +%F)
case "$stage" in
  bench)
    python3 -m editflow.cli bench train --model kontext_real_width --resolution 1024 --batch 1 --steps 10 \
        --out "$out/$day-real-width.json" 2>&1 | tee "$out/bench.log" ;;
  lora24)
    python3 -m editflow.cli bench train experiment=lora_24gb optim.name=adamw8bit_torchao --full-depth \
        --resolution 1024 --batch 1 --steps 5 --memory-cap-gb 24 --only editflow \
        --out "$out/$day-lora24gb.json" 2>&1 | tee "$out/lora24.log" ;;
  preset)
    python3 -m accelerate.commands.launch --config_file launch/accelerate/deepspeed_zero3.yaml --num_processes 1 \
        -m editflow.train experiment=gpt_image_edit_8xa100 data=toy data.train=null data.val=null model=kontext_real_width model.connector.init_from=null \
        'model.qwen.pretrained=${asset:tiny/qwen}' 'model.vae.pretrained=${asset:tiny/vae}' model.vae.subfolder=null \
        data.toy.size=512 data.bucket_base=512 data.toy.num_train=256 data.toy.num_val=8 \
        trainer.global_batch_size=8 trainer.micro_batch_size=2 trainer.max_steps=12 trainer.log_every=4 \
        trainer.checkpoint_every=0 eval.every=null eval.num_samples=4 eval.steps=4 logging.wandb=false \
        optim.warmup_steps=2 hydra.run.dir="$out/preset-run" 2>&1 | tee "$out/preset.log"
    cp "$out/preset-run/metrics.jsonl" "$out/$day-preset-metrics.jsonl" 2>/dev/null
    rm -rf "$out/preset-run" ;;  # only files two folders down come back
  *) echo "unknown stage $stage" >&2; exit 2 ;;
esac
