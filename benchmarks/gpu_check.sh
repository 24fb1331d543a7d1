#!/usr/bin/env bash
# The GPU check in one call (issue 19): on a machine with a CUDA GPU, in under 8 minutes,
# one JSON line per check on stdout:
#   device          the GPU torch sees, bf16 support, CUDA and torch versions
#   quickstart_gpu  sweeps/quickstart.yaml with resources.use_gpu=true, one GPU worker per
#                   trial (every stage on the GPU: fine-tune under DDP over NCCL, extraction,
#                   SAE fit in bf16 autocast, evaluation), its wall time and trial statuses
#   sae_step        ours vs eai-sparsify, tokens/s, bf16 autocast on CUDA
#   gpu_flops       the SAE step's FLOP/s against a bf16 matmul of the encoder's shape
#   fit_bound_d*    per width: the streamed feed's rows/s (CPU) vs an SAE step's tokens/s
#                   (GPU): which of the two bounds a fit there
# Logs go to $OUT (or a temp dir) as gpu_check-*.log. Exit 1 if a check failed.
#   bash benchmarks/gpu_check.sh            # with .venv/bin/python, else python3
#   PYTHON=/opt/env/bin/python bash benchmarks/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-}"
if [ -z "$PY" ]; then
  if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
LOGS="${OUT:-$(mktemp -d)}"
export WANDB_MODE=offline
failed=0

"$PY" - <<'EOF' || exit 1
import json, sys
import torch
ok = torch.cuda.is_available()
line = {"check": "device", "ok": ok, "torch": torch.__version__, "cuda": torch.version.cuda}
if ok:
    line.update(name=torch.cuda.get_device_name(0), count=torch.cuda.device_count(),
                bf16=torch.cuda.is_bf16_supported())
else:
    line["error"] = "torch sees no CUDA GPU: this check needs one"
print(json.dumps(line), flush=True)
sys.exit(0 if ok else 1)
EOF

runs="$(mktemp -d)"
started=$(date +%s)
timeout 330 "$PY" -m sae_ray sweep sweeps/quickstart.yaml \
  resources.use_gpu=true resources.num_workers=1 resources.cpus_per_worker=2 \
  "experiment.storage_path=$runs" wandb.mode=disabled >"$LOGS/gpu_check-quickstart.log" 2>&1
rc=$?
"$PY" - "$runs/quickstart/results.csv" "$rc" "$(( $(date +%s) - started ))" <<'EOF' || failed=1
import json, sys
from pathlib import Path
import pandas as pd
path, rc, wall = Path(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])
line = {"check": "quickstart_gpu", "rc": rc, "wall_s": wall}
if path.is_file():
    df = pd.read_csv(path)
    last = df.sort_values("cycle").groupby("trial_id").tail(1)
    line["trials"] = {str(s): int(n) for s, n in last["status"].value_counts().items()}
    line["stage_s"] = {c: round(float(df[c].sum()), 1) for c in df.columns if c.startswith("time/")}
    line["interp_u"] = [round(float(v), 4) for v in last["interp/u"].dropna()]
line["ok"] = rc == 0 and line.get("trials", {}).get("COMPLETE", 0) == 4
print(json.dumps(line), flush=True)
sys.exit(0 if line["ok"] else 1)
EOF

for figure in sae_step gpu_flops fit_bound; do
  timeout 120 "$PY" -m "benchmarks.$figure" 2>"$LOGS/gpu_check-$figure.log" || {
    echo "{\"check\": \"$figure\", \"ok\": false, \"error\": \"see $LOGS/gpu_check-$figure.log\"}"
    failed=1
  }
done
exit $failed
