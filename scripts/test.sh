#!/usr/bin/env bash
# The test command: starts the services the tests need (a real redis-server on a free loopback port),
# runs the whole pytest suite, and stops what it started.
set -uo pipefail
cd "$(dirname "$0")/.."
# The suite starts TorchServe, BentoML and redis servers beside the test process on a 2-core machine:
# one math thread per process avoids OpenMP oversubscription (measured here: up to 10-70x slower).
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}" MKL_NUM_THREADS="${MKL_NUM_THREADS:-1}"
export GUARDIAN_TEST_REDIS_PORT="${GUARDIAN_TEST_REDIS_PORT:-$(.venv/bin/python -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')}"
redis_dir=$(mktemp -d)
redis-server --port "$GUARDIAN_TEST_REDIS_PORT" --bind 127.0.0.1 --save "" --appendonly no --dir "$redis_dir" --daemonize yes \
  --pidfile "$redis_dir/redis.pid" --logfile "$redis_dir/redis.log"
export GUARDIAN_TEST_REDIS_URL="redis://127.0.0.1:$GUARDIAN_TEST_REDIS_PORT/0"
cleanup() { [ -f "$redis_dir/redis.pid" ] && kill "$(cat "$redis_dir/redis.pid")" 2>/dev/null; rm -rf "$redis_dir"; }
trap cleanup EXIT
.venv/bin/python -m pytest "$@"
