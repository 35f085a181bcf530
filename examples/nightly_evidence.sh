#!/bin/bash
# Three nightly runs on the tiny demo in a scratch clone of this checkout's branch (evidence for issue 13):
#   examples/nightly_evidence.sh > evidence.out      (VENV=path/to/.venv to use another virtualenv)
# Writes /tmp/nd (the clone: run*.log, overlap_*.log, registry/), /tmp/nd_seed1, /tmp/nd_seed2.
set -u
REPO=$(git -C "$(dirname "$0")" rev-parse --show-toplevel)
VENV=$(cd "${VENV:-$REPO/.venv}" && pwd)
BRANCH=$(git -C "$REPO" rev-parse --abbrev-ref HEAD)
rm -rf /tmp/nd /tmp/nd_seed1 /tmp/nd_seed2 && git clone -q -b "$BRANCH" "$REPO" /tmp/nd && cd /tmp/nd
export PATH=$VENV/bin:$PATH PYTHONPATH=/tmp/nd DVC_NO_ANALYTICS=1 DO_NOT_TRACK=1 \
       PREFECT_SERVER_ANALYTICS_ENABLED=false MLFLOW_DISABLE_TELEMETRY=true
unset PREFECT_API_URL
sed -i 's/^  demo_size: small /  demo_size: tiny  /' params.yaml
git -c user.email=e@x -c user.name=evidence commit -qam "evidence: tiny demo"
python -m defectflow.cli demo
for s in 1 2; do
  sed "s/^seed: 0/seed: $s/" params.yaml > /tmp/p_seed$s.yaml
  python -m defectflow.cli demo --params /tmp/p_seed$s.yaml --out /tmp/nd_seed$s > /dev/null
done
inbox() {  # the good training videos of another seed's demo -> data/inbox (named <run>_<camera>.avi)
  mkdir -p data/inbox
  python - "$1" <<'PY'
import sys, shutil, pandas as pd
src = sys.argv[1]
v = pd.read_csv(f"{src}/videos.csv")
for r in v[v.split == "train"].itertuples():
    shutil.copy(f"{src}/{r.video}", f"data/inbox/s{src[-1]}{r.run}_{r.camera}.avi")
print("inbox:", sorted(__import__("os").listdir("data/inbox")))
PY
}
echo "=== run 1 $(date -u +%T)"
/usr/bin/time -f "run 1: %e s" python -m flows.server -- python -m flows.nightly --once > run1.log 2>&1
tail -3 run1.log
echo "=== run 2 (+ seed-1 good videos) $(date -u +%T)"
inbox /tmp/nd_seed1
( /usr/bin/time -f "run 2: %e s" python -m flows.server -- python -m flows.nightly --once > run2.log 2>&1 ) &
R2=$!
sleep 25
echo "--- overlapping run while run 2 holds the lock $(date -u +%T)"
/usr/bin/time -f "overlap (flow): %e s" python -m flows.server -- python -m flows.nightly --once > overlap_flow.log 2>&1
/usr/bin/time -f "overlap (cli): %e s" python -m defectflow.cli nightly > overlap_cli.log 2>&1; echo "cli exit $?" >> overlap_cli.log
wait $R2
tail -3 run2.log
echo "=== run 3 (+ seed-2 good videos, gate.max_auroc_drop -1: must be rejected) $(date -u +%T)"
inbox /tmp/nd_seed2
sed -i 's/^  max_auroc_drop: 0.02 /  max_auroc_drop: -1   /' params.yaml
git -c user.email=e@x -c user.name=evidence commit -qam "evidence: impossible AUROC tolerance"
/usr/bin/time -f "run 3: %e s" python -m flows.server -- python -m flows.nightly --once > run3.log 2>&1
tail -3 run3.log
echo "=== models list $(date -u +%T)"
python -m defectflow.cli models list
echo "=== export reads the champion"
python -m defectflow.cli export 2>&1 | tail -3
echo "=== done $(date -u +%T)"
