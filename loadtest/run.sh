#!/usr/bin/env bash
# Run the Locust load test headless against a running tome-serve and keep the reports.
#
#   loadtest/run.sh URL [DURATION] [OUT_DIR]
#   loadtest/run.sh http://127.0.0.1:8000 60s out/loadtest/cpu-16users
#   LOADTEST_SHAPE=step USERS=32 loadtest/run.sh http://127.0.0.1:8000 90s out/loadtest/step
#
# Writes into OUT_DIR: report.html (Locust's HTML report), locust_stats.csv, locust_stats_history.csv,
# locust_failures.csv, locust_exceptions.csv, levels.md and levels.json (per user count: answered
# req/s, p50/p95/p99 of answered requests, 429 share), and locust.log.
# USERS (default 16) and SPAWN_RATE (default 4/s) set the load; with LOADTEST_SHAPE=step, USERS is the top
# step. Every LOADTEST_* / TOME_API_KEY variable of locustfile.py passes through.
# Exits non-zero when any request failed (a 429 is not a failure).
set -euo pipefail

url=${1:?usage: loadtest/run.sh URL [DURATION] [OUT_DIR]}
duration=${2:-60s}
out=${3:-out/loadtest/$(date +%Y%m%d-%H%M%S)}
here=$(cd "$(dirname "$0")" && pwd)
python=${PYTHON:-python3}

mkdir -p "$out"
echo "load test: $url for $duration, users=${USERS:-16}, shape=${LOADTEST_SHAPE:-constant} -> $out" >&2
LOADTEST_REPORT_DIR="$out" exec "$python" -m locust \
    --locustfile "$here/locustfile.py" \
    --headless \
    --host "$url" \
    --users "${USERS:-16}" \
    --spawn-rate "${SPAWN_RATE:-4}" \
    --run-time "$duration" \
    --stop-timeout 15 \
    --csv "$out/locust" \
    --html "$out/report.html" \
    --logfile "$out/locust.log" \
    --only-summary
