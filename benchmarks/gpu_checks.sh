#!/usr/bin/env bash
# Checks that need a CUDA GPU (a lent H100/H200), run as one short script: bash benchmarks/gpu_checks.sh [OUT_DIR]
# Each line prints a table and, with --json, one JSON object as its last line (saved under OUT_DIR).
set -euo pipefail
out="${1:-${OUT:-gpu_out}}"
mkdir -p "$out"
export PYTHONPATH="${PYTHONPATH:-$PWD/src}"

# LoRA vs full fine-tuning on BAGEL-7B-MoT widths cut to 2 layers (bf16 base, fp32 adapters) — issue 15
python benchmarks/bench_lora.py --device cuda --layers 2 --repeats 5 --json | tee "$out/bench_lora_cuda.txt"

# A few FSDP2 bf16 steps of bagel_7b/sft_chat_fsdp on BAGEL-7B widths cut to 2 layers, beside `chatumm plan`'s
# memory prediction (keys mfu, peak_mem_gib, plan_mem_gib) — issue 13
python benchmarks/bench_bagel_step.py --device cuda --layers 2 --tokens 8192 --steps 5 --json \
  | tee "$out/bench_bagel_step_cuda.txt"

# chatumm chat on a BAGEL-7B-shaped random model (kit folder, 2 layers) in bf16 on the GPU: a text-to-image, an edit
# and a VQA turn; ms per Euler step (all CFG contexts, 1024² images) and per text token — issue 14
python benchmarks/bench_bagel_chat.py --device cuda --dtype bfloat16 --layers 2 --steps 10 --json \
  | tee "$out/bench_bagel_chat_cuda.txt"
