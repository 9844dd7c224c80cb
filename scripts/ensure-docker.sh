#!/usr/bin/env bash
# Start a Docker engine when none answers (fresh machines and CI have only the client).
set -euo pipefail
if docker info >/dev/null 2>&1; then
  exit 0
fi
if command -v systemctl >/dev/null && systemctl is-system-running >/dev/null 2>&1; then
  systemctl start docker
else
  echo "starting dockerd (log: /var/log/dockerd.log)"
  nohup dockerd >/var/log/dockerd.log 2>&1 &
fi
for _ in $(seq 1 60); do
  docker info >/dev/null 2>&1 && exit 0
  sleep 1
done
echo "dockerd did not answer within 60 s; last log lines:" >&2
tail -20 /var/log/dockerd.log >&2 || true
exit 1
