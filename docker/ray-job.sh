#!/bin/sh
# Runs a command as a Ray job from a container of the compose profile `ray` (e.g. the `ray-build` service):
# joins the cluster at HAT_RAY_HEAD as a node with no CPUs or GPUs (the command is the Ray driver; a driver
# needs a Ray node in its own container, and a node with nothing to offer gets no tasks), waits until
# HAT_RAY_WORKERS nodes with CPUs are alive (at most HAT_RAY_WAIT_S seconds), runs the command, leaves the
# cluster (gracefully) and exits with the command's status (non-zero when the cluster never came up).
#   ray-job.sh python -m index_builder build ... --ray ray-head:6379
set -eu

HEAD=${HAT_RAY_HEAD:-ray-head:6379}
WORKERS=${HAT_RAY_WORKERS:-2}
WAIT_S=${HAT_RAY_WAIT_S:-300}

if [ "$#" -eq 0 ]; then
  echo "usage: ray-job.sh COMMAND [ARGS...]" >&2
  exit 2
fi

# `ray start` retries an unreachable head for a while, then fails: that ends the job (set -e).
ray start --address="$HEAD" --num-cpus=0 --num-gpus=0 --disable-usage-stats \
  ${HAT_RAY_OBJECT_STORE_BYTES:+--object-store-memory="$HAT_RAY_OBJECT_STORE_BYTES"}

rc=0
python - "$HEAD" "$WORKERS" "$WAIT_S" <<'EOF' || rc=$?
import sys
import time

import ray

head, want, wait_s = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
ray.init(address=head, logging_level="ERROR", log_to_driver=False)
deadline = time.monotonic() + wait_s
while True:
    alive = [n for n in ray.nodes() if n["Alive"] and n["Resources"].get("CPU", 0) > 0]
    if len(alive) >= want:
        names = sorted(n["NodeManagerHostname"] for n in alive)
        print(f"ray-job: {len(alive)} worker nodes up: {', '.join(names)}", flush=True)
        break
    if time.monotonic() > deadline:
        sys.exit(f"ray-job: only {len(alive)} of {want} worker nodes joined {head} within {wait_s:g} s")
    time.sleep(2)
EOF

if [ "$rc" -eq 0 ]; then
  "$@" || rc=$?
fi
# A graceful stop: the node says goodbye, so the head drops it (and the actors pinned to it) at once instead
# of after its health checks time out; the next job's driver then finds no helper actor stranded here.
ray stop --grace-period 15 >/dev/null 2>&1 || ray stop --force >/dev/null 2>&1 || true
exit "$rc"
