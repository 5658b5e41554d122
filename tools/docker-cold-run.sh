#!/bin/bash
# Cold run of the Docker stack, as measured in docs/benchmarks.md "Docker": run after removing every image and the
# build cache (docker system prune -af && docker builder prune -af). Prints the times of each step.
set -e
cd "$(dirname "$0")/.."
export HAT_PUBLISH_PORT=18080
t0=$(date +%s)
bash ../shared/tools/docker-engine.sh > /tmp/cold-engine.log 2>&1
t1=$(date +%s)
docker compose -p hat-cold build api > /tmp/cold-build.log 2>&1
t2=$(date +%s)
docker compose -p hat-cold up -d api >> /tmp/cold-build.log 2>&1
until [ "$(docker inspect --format '{{.State.Health.Status}}' $(docker compose -p hat-cold ps -q api))" = healthy ]; do sleep 2; done
t3=$(date +%s)
curl -s -X POST localhost:18080/search/text -H 'content-type: application/json' -d '{"query":"a red circle","k":3}' | head -c 300; echo
echo "engine_s=$((t1-t0)) build_s=$((t2-t1)) up_to_healthy_s=$((t3-t2)) total_s=$((t3-t0))"
docker images hat-search --format '{{.Repository}}:{{.Tag}} {{.Size}}'
docker compose -p hat-cold down -v >/dev/null 2>&1
