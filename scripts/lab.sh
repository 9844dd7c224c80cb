#!/usr/bin/env bash
# The lab: containers that behave like real hosts (systemd as PID 1, their own
# address on a private docker network) for site.yml and the demo.
#
#   scripts/lab.sh up       create the hosts of inventories/lab (idempotent)
#   scripts/lab.sh down     remove every lab container and the network
#   scripts/lab.sh status   list the hosts, their address and systemd state
#
# LAB_DISTRO=bookworm|trixie picks Debian 12 or 13 (default bookworm).
# The gateway's ports are published on loopback only: 127.0.0.1:8080 (HTTP)
# and 127.0.0.1:8443 (HTTPS).
set -euo pipefail

distro=${LAB_DISTRO:-bookworm}
repo=$(cd "$(dirname "$0")/.." && pwd)
network=llm-lab
label=io.llm-gateway.lab
hosts=(gw1 gpu1 gpu2)

# The run options that let systemd be PID 1 without --privileged (see DESIGN.md).
systemd_opts=(
  --cgroupns host -v /sys/fs/cgroup:/sys/fs/cgroup:rw
  --cap-add SYS_ADMIN --cap-add NET_ADMIN
  --security-opt seccomp=unconfined --security-opt apparmor=unconfined
  --tmpfs /run --tmpfs /run/lock --tmpfs /tmp
)

wait_for_systemd() {
  local name=$1 state
  for _ in $(seq 1 60); do
    state=$(docker exec "$name" systemctl is-system-running 2>/dev/null || true)
    case "$state" in running | degraded) return 0 ;; esac
    sleep 1
  done
  echo "$name: systemd did not finish booting (state: ${state:-none})" >&2
  return 1
}

up() {
  docker image inspect "llm-lab/debian:$distro" >/dev/null 2>&1 || "$repo/files/lab/build-image.sh" "$distro"
  [ -e "$repo/.cache/lab/model-images.tar" ] || "$repo/files/lab/build-model-images.sh"
  docker network inspect "$network" >/dev/null 2>&1 ||
    docker network create --label "$label=true" "$network" >/dev/null
  for host in "${hosts[@]}"; do
    local name="llm-lab-$host" ports=() volumes=()
    if docker container inspect "$name" >/dev/null 2>&1; then
      docker start "$name" >/dev/null
      continue
    fi
    [ "$host" = gw1 ] && ports=(-p 127.0.0.1:8080:80 -p 127.0.0.1:8443:443)
    # gpu2 runs Infinity in a container: its own Docker Engine's storage on a volume
    # (overlay2), the model images and weights of build-model-images.sh read-only.
    [ "$host" = gpu2 ] && volumes=(-v /var/lib/docker
      -v "$repo/.cache/lab:/srv/lab-cache:ro" -v "$repo/.cache/lab/models:/srv/models:ro")
    docker run -d --name "$name" --hostname "$host" --network "$network" \
      --label "$label=true" "${systemd_opts[@]}" "${ports[@]}" "${volumes[@]}" \
      "llm-lab/debian:$distro" >/dev/null
  done
  for host in "${hosts[@]}"; do wait_for_systemd "llm-lab-$host"; done
  status
}

down() {
  local ids
  ids=$(docker ps -aq --filter "label=$label")
  [ -z "$ids" ] || docker rm -f -v $ids >/dev/null  # -v: gpu2's docker volume too
  docker network ls -q --filter "label=$label" | xargs -r docker network rm >/dev/null
  echo "lab removed"
}

status() {
  printf '%-14s %-10s %-16s %s\n' CONTAINER STATE ADDRESS SYSTEMD
  docker ps -a --filter "label=$label" --format '{{.Names}}' | sort | while read -r name; do
    local state address systemd
    state=$(docker inspect -f '{{.State.Status}}' "$name")
    address=$(docker inspect -f '{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}' "$name")
    systemd=$(docker exec "$name" systemctl is-system-running 2>/dev/null || true)
    printf '%-14s %-10s %-16s %s\n' "$name" "$state" "${address:--}" "${systemd:--}"
  done
}

case "${1:-}" in
  up | down | status) "$1" ;;
  *) echo "usage: $0 up|down|status" >&2; exit 2 ;;
esac
