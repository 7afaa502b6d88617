#!/usr/bin/env bash
# Run benchmarks/gpu_runs.py on a lent GPU machine (bare image: its own torch/transformers, no
# ../shared, no internet). Prepare here first:
#   pip download the missing wheels into .whl/ (datasets, dill, multiprocess, pydantic, pydantic-core,
#   annotated-types, typing-inspection, typer; cp312 manylinux), then
#   python benchmarks/gpu_carry.py pack .devdata
# and run this with .whl and .devdata carried:  bash benchmarks/gpu_session.sh OUT_DIR BUDGET_S [gpu_runs.py args]
# BUDGET_S is the orchestrator's clock, which starts after ~25 s of setup here (wheels, unpack): keep the
# device call's timeout_s at least 40 s above it (session 11's second call, 215 of 240 s, was cut off).
# e.g. session 4:  bash benchmarks/gpu_session.sh $OUT 540 --bf16 --only sst2-dense squad-dense sst2-long-... squad-long-...
set -euo pipefail
out=${1:?output dir}; budget=${2:-530}
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD/src PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 OMP_NUM_THREADS=1
nvidia-smi -L
python3 -c "import torch, transformers, datasets, sparsebert.cli; print('torch', torch.__version__, 'transformers', transformers.__version__, 'datasets', datasets.__version__, torch.cuda.get_device_name())"
python3 benchmarks/gpu_carry.py unpack .devdata /tmp/dev
export SPARSEBERT_DATA_DIR=/tmp/dev/data
python3 benchmarks/gpu_runs.py --model /tmp/dev/minilm --work /tmp/gpu_runs --out "$out" --budget "$budget" "${@:3}" 2>&1 | tee "$out/orchestrator.log"
