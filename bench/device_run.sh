#!/usr/bin/env bash
# Runs bench/serving_benchmark.py on the lent GPU machine as a detached job (it outlasts one call's
# 10-minute limit) and collects its files into $OUT. Run from the repo root after
# `. /tmp/stage/env.sh` (see ../shared/device/README.md).
#   bash bench/device_run.sh start [serving_benchmark.py flags...]   # launch, then wait like `wait`
#   bash bench/device_run.sh wait [SECONDS]                         # wait (default 540 s), collect
set -uo pipefail
STATE=/tmp/sbench
mode=${1:-wait}; shift || true
if [ "$mode" = start ]; then
  rm -rf "$STATE" && mkdir -p "$STATE/results"
  export BENCH_RAY_TEMP_DIR=$STATE/ray
  setsid nohup python3 bench/serving_benchmark.py --results-dir "$STATE/results" \
    --workdir "$STATE/work" --partial-copy "$STATE/runs.json" "$@" \
    >"$STATE/table.md" 2>"$STATE/bench.log" </dev/null &
  echo $! >"$STATE/pid"
  wait_s=${WAIT_S:-540}
else
  wait_s=${1:-540}
fi
pid=$(cat "$STATE/pid")
end=$((SECONDS + wait_s))
while kill -0 "$pid" 2>/dev/null && [ $SECONDS -lt $end ]; do sleep 5; done
if kill -0 "$pid" 2>/dev/null; then echo "STILL RUNNING (pid $pid)"; else echo "FINISHED"; fi
mkdir -p "$OUT"
cp "$STATE/bench.log" "$STATE/table.md" "$OUT/" 2>/dev/null
[ -f "$STATE/runs.json" ] && cp "$STATE/runs.json" "$OUT/"
cp "$STATE"/results/* "$OUT/" 2>/dev/null
# The per-target logs, tails only (the files back from $OUT are limited in number and size).
( cd "$STATE/work" 2>/dev/null && for f in *.log; do echo "=== $f"; tail -c 20000 "$f"; done ) \
  >"$OUT/target_logs.txt" 2>/dev/null
for f in "$STATE"/ray/session_*/logs/serve/replica_*.log; do
  [ -f "$f" ] && { echo "=== $f"; tail -c 8000 "$f"; }
done >>"$OUT/target_logs.txt" 2>/dev/null
nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv,noheader || true
tail -n 40 "$STATE/bench.log"
cat "$STATE/table.md"
