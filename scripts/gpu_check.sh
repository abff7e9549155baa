#!/usr/bin/env bash
# The GPU check, in one go (docs/operations.md, "GPU check"). On a machine with CUDA GPUs:
#   1. `sde-ray train` on tiny-clip in bf16 under ZeRO-2 and under ZeRO-3 with NCCL (2 workers when
#      there are >= 2 GPUs; NCCL refuses two ranks on one GPU, so a 1-GPU machine runs 1 worker),
#      with validation during training and the final evaluation on GPU eval actors after fit(),
#      and GradCache chunks when the config has train.micro_batch_size;
#   2. the tests marked `gpu`;
#   3. samples/s, peak GPU memory and MFU of a CLIP ViT-B/16-sized dual encoder (scripts/gpu_mfu.py).
# Prints one summary line per run and exits non-zero on the first failed check.
# Environment: OUT (default: a temp dir), WORKERS, STEPS (default 20), PYTHON (default python3).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export WANDB_MODE=offline WANDB_SILENT=true TOKENIZERS_PARALLELISM=false RAY_DEDUP_LOGS=0
unset DS_ACCELERATOR  # DeepSpeed picks CUDA
OUT=${OUT:-$(mktemp -d -t sde_ray_gpu_check_XXXX)}
STEPS=${STEPS:-20}
mkdir -p "$OUT"

NGPU=$("$PYTHON" -c "import torch; print(torch.cuda.device_count())")
if [ "$NGPU" -lt 1 ]; then echo "gpu_check: no CUDA GPU visible (torch.cuda.device_count() = 0)" >&2; exit 2; fi
WORKERS=${WORKERS:-$(( NGPU >= 2 ? 2 : 1 ))}
if [ "$WORKERS" -lt 2 ]; then
  echo "gpu_check: $NGPU GPU(s): running $WORKERS NCCL worker (2-rank NCCL collectives need 2 GPUs)"
fi
# GradCache (issue 13) when this checkout has it: chunks of 8 rows inside a per-worker batch of 32.
CHUNK=$("$PYTHON" -c "import dataclasses; from sde_ray.config import TrainConfig
print('train.micro_batch_size=8' if 'micro_batch_size' in {f.name for f in dataclasses.fields(TrainConfig)} else '')")
echo "gpu_check: outputs under $OUT; GPUs $NGPU, workers $WORKERS, GradCache: ${CHUNK:-not in this checkout}"

for STAGE in 2 3; do
  RUN="$OUT/zero$STAGE"
  OVERRIDES=(
    model.name_or_path=tiny-clip scaling.use_gpu=true "scaling.num_workers=$WORKERS"
    scaling.cpus_per_worker=2 data.data_cpus=4 deepspeed.precision=bf16 "deepspeed.zero_stage=$STAGE"
    "train.max_steps=$STEPS" train.eval_every=10 train.log_every=5 train.checkpoint_every=10
    "train.global_batch_size=$(( 32 * WORKERS ))" train.warmup_steps=2
    data.synth.train_per_subset=64 data.synth.eval_per_dataset=32 "data.cache_dir=$OUT/cache"
    eval.val_queries=64 eval.num_workers=1 logging.wandb=false "train.output_dir=$RUN"
  )
  if [ "$STAGE" = 3 ]; then
    OVERRIDES+=("deepspeed.overrides={zero_optimization: {stage3_param_persistence_threshold: 0}}")
  fi
  if [ -n "$CHUNK" ]; then OVERRIDES+=("$CHUNK"); fi
  timeout 1200 "$PYTHON" -m sde_ray.cli train "${OVERRIDES[@]}" > "$RUN.log" 2>&1 \
    || { echo "gpu_check: ZeRO-$STAGE training failed; last lines of $RUN.log:" >&2; tail -40 "$RUN.log" >&2; exit 1; }
  "$PYTHON" - "$RUN" "$STAGE" <<'PY'
import json, sys
from pathlib import Path
run, stage = Path(sys.argv[1]), sys.argv[2]
results = json.loads((run / "results.json").read_text())
rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line]
validated = [r["val_p_at_1"] for r in rows if "val_p_at_1" in r]
actors = results.get("evaluated_by") or []
train = results["train"]
problems = []
if not validated:
    problems.append("no validation P@1 in metrics.jsonl")
if not actors or not all(a["device"].startswith("cuda") for a in actors):
    problems.append(f"final eval not on a GPU actor: {actors}")
if results.get("overall") is None:
    problems.append("no final P@1")
samples = [r["samples_per_s"] for r in rows if "samples_per_s" in r]
print(f"ZeRO-{stage} bf16: world {train.get('world_size')}, steps {train.get('step')}, "
      f"samples/s {samples[-1] if samples else float('nan'):.1f} (last window), "
      f"peak GPU memory {train.get('peak_gpu_memory_gib', float('nan')):.2f} GiB (rank 0), "
      f"val P@1 {validated[-1] if validated else float('nan'):.3f}, final P@1 {results.get('overall')}, "
      f"eval on {[a['device'] + '/' + a['precision'] for a in actors]}")
if problems:
    sys.exit("gpu_check: ZeRO-" + stage + ": " + "; ".join(problems))
PY
done

timeout 900 "$PYTHON" -m pytest -q -m gpu tests -p no:cacheprovider
timeout 600 "$PYTHON" scripts/gpu_mfu.py --batch 256 --steps 20 | tee "$OUT/mfu.json"
echo "gpu_check: all checks passed ($OUT)"
