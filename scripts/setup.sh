#!/usr/bin/env bash
# One-time (and idempotent) set-up of a fresh machine for the toolkit and its lab:
#   - Debian packages: docker.io, debootstrap (lab images), nginx with njs and the
#     cache purge module (the router's unit tests run it on loopback), wrk (the
#     benchmark's load generator), mtail, Prometheus and its nginx and blackbox
#     exporters (the metrics tests run them on loopback)
#   - a Docker engine, started when none answers
#   - .venv with the pinned development requirements (ansible, molecule, ...)
#   - the lab images for Debian 12 and Debian 13
#   - with LAB_MODEL_IMAGES=1: the model images and weights the docker GPU hosts of
#     the model_servers scenario load (files/lab/build-model-images.sh, ~2 min once)
# Safe to run again: every step checks before it acts.
set -euo pipefail
cd "$(dirname "$0")/.."

log() { printf '\n== %s\n' "$*"; }

need_apt=()
command -v dockerd >/dev/null || need_apt+=(docker.io)
command -v debootstrap >/dev/null || need_apt+=(debootstrap)
command -v nginx >/dev/null || need_apt+=(nginx)
[ -e /usr/lib/nginx/modules/ngx_http_js_module.so ] || need_apt+=(libnginx-mod-http-js)
[ -e /usr/lib/nginx/modules/ngx_http_cache_purge_module.so ] || need_apt+=(libnginx-mod-http-cache-purge)
command -v wrk >/dev/null || need_apt+=(wrk)
# The metrics tests run Debian's mtail, nginx exporter, Prometheus (promtool) and
# blackbox exporter as processes on loopback (tests/nginx/test_metrics.py).
command -v mtail >/dev/null || need_apt+=(mtail)
command -v prometheus-nginx-exporter >/dev/null || need_apt+=(prometheus-nginx-exporter)
command -v promtool >/dev/null || need_apt+=(prometheus)
command -v prometheus-blackbox-exporter >/dev/null || need_apt+=(prometheus-blackbox-exporter)
if [ ${#need_apt[@]} -gt 0 ]; then
  log "installing ${need_apt[*]} from Debian"
  export DEBIAN_FRONTEND=noninteractive
  # The tests start nginx (and Prometheus, mtail, the exporters) themselves on
  # loopback; keep the packages from starting system-wide services on port 80,
  # 9090 and the like (policy-rc.d is Debian's switch for that).
  policy=/usr/sbin/policy-rc.d
  [ -e "$policy" ] || { printf '#!/bin/sh\nexit 101\n' >"$policy"; chmod +x "$policy"; trap 'rm -f "$policy"' EXIT; }
  apt-get update -qq
  apt-get install -y -qq "${need_apt[@]}" >/dev/null
fi

scripts/ensure-docker.sh

if [ ! -x .venv/bin/ansible-playbook ] || ! cmp -s requirements-dev.txt .venv/.requirements-dev.txt; then
  log "creating .venv from requirements-dev.txt"
  python3 -m venv .venv
  .venv/bin/pip install -q --upgrade pip >/dev/null
  .venv/bin/pip install -q -r requirements-dev.txt
  cp requirements-dev.txt .venv/.requirements-dev.txt
fi

# The `ansible` package bundles the collections requirements.yml names, so this
# answers "Nothing to do" without reaching Galaxy; it fails loudly if one is missing.
.venv/bin/ansible-galaxy collection install -r requirements.yml >/dev/null

log "building lab images"
for suite in ${LAB_SUITES:-bookworm trixie}; do
  files/lab/build-image.sh "$suite"
done

if [ "${LAB_MODEL_IMAGES:-0}" = 1 ]; then
  log "building the lab's model images"
  files/lab/build-model-images.sh
fi
