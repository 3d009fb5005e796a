#!/usr/bin/env bash
# The CUDA path in one run on a GPU host, which CI does not have and which may have no package
# registry: the gpu-marked tests, then the default model on real tables exported beforehand.
#
#   python benchmarks/quality.py --tables cells,diamonds --export .gpu/tables   # here, with `.[bench]`
#   bash benchmarks/gpu_check.sh [.gpu/tables]                                  # there; logs in $OUT
#
# Needs there: torch with CUDA, numpy, pandas, pyarrow, PyYAML and pytest (not MLflow, Prefect, DVC,
# GX: the library and the train/evaluate steps alone).
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-/tmp/gpu-check}
tables=${1:-.gpu/tables}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())"
timeout 180 python3 -m pytest -m gpu tests/vae -q -p no:cacheprovider 2>&1 | tee "$out/pytest-gpu.log" | tail -15
quality() {  # one row of quality.py per setting: the default model, train.device=cuda
    timeout 240 python3 benchmarks/quality.py --from "$tables" --max-k 0 --set train.device=cuda \
        --set train.num_threads=0 "$@" 2>&1 | grep -v "^nats/row" | tee -a "$out/quality-cuda.log"
}
quality --tables cells,diamonds
quality --tables diamonds --set train.batch_size=4096 --set train.lr_scaling=sqrt
