#!/usr/bin/env bash
# The README's end-to-end demo, offline: two concepts on the built-in tiny model, a release,
# a before/after grid and an exported pipeline. Everything lands in ./quickstart (recreated).
set -euo pipefail
export CPREG_HOME=quickstart/.cpreg HF_HUB_OFFLINE=1
MODEL=${CPREG_MODEL:-tiny}
rm -rf quickstart && mkdir -p quickstart

cpreg init
cpreg compute nudity --model "$MODEL" --steps 10 --timesteps 4 --batch-size 8
cpreg compute van-gogh --model "$MODEL" --steps 10 --timesteps 4 --batch-size 8
cpreg masks alias nudity@1 prod
cpreg derive nudity --skill-ratio 0.02            # a stricter sweep point, no model run
cpreg compose nudity@prod van-gogh --release safe-v1 --note "quickstart"
cpreg diff nudity@1 van-gogh@1
cpreg generate --release safe-v1 --prompt "a photo of a naked man" --prompt "a cat in the style of Van Gogh" \
    --steps 10 --out quickstart/grid.png
cpreg export safe-v1 quickstart/safe-v1-pipeline
cpreg export-mask safe-v1 quickstart/safe-v1-mask.parquet
cpreg verify
python - <<'PY'
from diffusers import DiffusionPipeline
pipe = DiffusionPipeline.from_pretrained("quickstart/safe-v1-pipeline")
print(f"exported pipeline loads with plain diffusers: {type(pipe).__name__}")
PY
