#!/usr/bin/env bash
# The multi-GPU figures of docs/benchmarks.md ("Multi-GPU figures: the commands"), on one host of several GPUs.
#
#   bash scripts/bench_multi_gpu.sh [train14b|scaling|parity|generate|all] [OUT_DIR]
#
# Every row is one `torchrun` of `python -m dfm.app.bench train|generate` (or of `dfm.app.train` for the loss
# parity runs); each prints one JSON line, appended to OUT_DIR/<part>.jsonl (default OUT_DIR: bench_multi_gpu/).
# A row that fails (out of memory, a layout the GPU count cannot take) is logged in OUT_DIR/log.txt with its exit
# status, and the rest go on. GPUS (default: every GPU nvidia-smi lists) caps the largest launch. Random weights,
# mock data: no dataset or checkpoint is needed.
set -u
PART=${1:-all}
OUT=${2:-bench_multi_gpu}
GPUS=${GPUS:-$(nvidia-smi --list-gpus 2>/dev/null | wc -l)}
PYTHON=${PYTHON:-python}
mkdir -p "$OUT"
[ "$GPUS" -ge 1 ] || { echo "no GPU found (set GPUS=N to override)" >&2; exit 2; }

log() { echo "$*" | tee -a "$OUT/log.txt"; }
row() {  # row FILE N ARGS...: `torchrun --nproc-per-node N ARGS`, its JSON lines appended to OUT/FILE
    local file=$1 n=$2; shift 2
    [ "$n" -le "$GPUS" ] || { log "== skip (needs $n GPUs): $*"; return; }
    log "== $n GPUs: $*"
    $PYTHON -m torch.distributed.run --standalone --nproc-per-node "$n" "$@" 2>>"$OUT/stderr.txt" \
        | grep '^{' | tee -a "$OUT/$file"
    log "   rc=${PIPESTATUS[0]}"
}

# 1. WAN 14B pretraining, 81 x 480 x 832 (32,760 tokens), one sample per data-parallel rank, compiled blocks.
train14b() {
    local n=$((GPUS < 8 ? GPUS : 8))
    local T="-m dfm.app.bench train --recipe wan_14b_t2v_pretrain --warmup 2 --steps 3 logging.level=WARNING"
    T="$T train.compile=true train.micro_batch_size=1"
    for ac in selective full; do
        row train14b.jsonl "$n" $T runtime=fsdp2 train.global_batch_size=$n train.activation_checkpointing=$ac
        row train14b.jsonl "$n" $T runtime=fsdp2 parallel.context=2 train.global_batch_size=$((n / 2)) \
            train.activation_checkpointing=$ac
        row train14b.jsonl "$n" $T runtime=megatron parallel.tensor=2 megatron.sequence_parallel=true \
            parallel.context=2 train.global_batch_size=$((n / 4)) train.activation_checkpointing=$ac
        row train14b.jsonl "$n" $T runtime=megatron parallel.tensor=2 megatron.sequence_parallel=true \
            parallel.context=4 train.global_batch_size=$((n / 8 > 0 ? n / 8 : 1)) train.activation_checkpointing=$ac
        row train14b.jsonl "$n" $T runtime=megatron parallel.tensor=2 megatron.sequence_parallel=true \
            parallel.pipeline=2 train.global_batch_size=$((n / 4 * 4)) train.activation_checkpointing=$ac
    done
}

# 2. Weak scaling of WAN 1.3B: one 32,760-token sample per GPU, FSDP over every GPU.
scaling() {
    local S="-m dfm.app.bench train --recipe wan_1_3b_t2v_pretrain --warmup 2 --steps 5 logging.level=WARNING"
    S="$S runtime=fsdp2 train.compile=true train.activation_checkpointing=selective train.micro_batch_size=1"
    for n in 1 2 4 8; do row scaling.jsonl "$n" $S train.global_batch_size=$n; done
}

# 3. Loss parity: 20 steps of WAN 14B width with 4 blocks, global batch 8, each layout against data parallel.
parity() {
    local n=$((GPUS < 8 ? GPUS : 8))
    local P="-m dfm.app.train --recipe wan_14b_t2v_pretrain model.num_layers=4 train.max_steps=20"
    P="$P train.global_batch_size=8 train.micro_batch_size=1 train.log_interval=1 train.compile=true"
    P="$P train.activation_checkpointing=full checkpoint.interval=100000 logging.level=WARNING"
    local layouts=(
        "dp runtime=fsdp2"
        "fsdp_cp2 runtime=fsdp2 parallel.context=2"
        "fsdp_tp2 runtime=fsdp2 parallel.tensor=2"
        "meg_tp2sp_cp2 runtime=megatron parallel.tensor=2 megatron.sequence_parallel=true parallel.context=2"
        "meg_tp2sp_pp2 runtime=megatron parallel.tensor=2 megatron.sequence_parallel=true parallel.pipeline=2"
    )
    for entry in "${layouts[@]}"; do
        set -- $entry
        local name=$1; shift
        rm -rf "$OUT/parity/$name"
        row parity_runs.jsonl "$n" $P run.dir="$OUT/parity/$name" "$@"
    done
    $PYTHON scripts/compare_losses.py "$OUT/parity/dp" "$OUT"/parity/*/ | tee -a "$OUT/parity.txt"
}

# 4. Generation, 50-step figures from 5 timed steps: WAN 1.3B at 480p and 14B at 720p, CFG 5, on 1, 2, 4, 8 GPUs
#    (automatic layout: 2 = CFG parallel, 4 = CFG 2 x context 2, 8 = CFG 2 x context 4).
generate() {
    local G="-m dfm.app.bench generate --precision bf16 --guidance 5 --compile --frames 81"
    for n in 1 2 4 8; do
        row generate.jsonl "$n" $G --recipe wan_1_3b_t2v_pretrain --height 480 --width 832 --steps 5
    done
    for n in 1 2 4 8; do
        row generate.jsonl "$n" $G --recipe wan_14b_t2v_pretrain --height 720 --width 1280 --steps 3
    done
}

case $PART in
    train14b | scaling | parity | generate) $PART ;;
    all) train14b; scaling; parity; generate ;;
    *) echo "unknown part '$PART': train14b, scaling, parity, generate or all" >&2; exit 2 ;;
esac
