#!/usr/bin/env bash
# README command (1): set everything up on a fresh machine, bring the lab up and
# deploy the stack into it with site.yml, then send one request through the gateway.
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/setup.sh
export PATH="$PWD/.venv/bin:$PATH"

echo; echo "== bringing the lab up"
scripts/lab.sh up

echo; echo "== placing the lab's test backend (the lab has no GPU for vLLM)"
ansible-playbook playbooks/lab_fixtures.yml

echo; echo "== ansible-playbook site.yml"
ansible-playbook site.yml

# Printed as a user would type it, then run exactly so.
request="curl -sS http://127.0.0.1:8080/v1/chat/completions -H 'Content-Type: application/json' \\
  -d '{\"model\": \"chat-small\", \"messages\": [{\"role\": \"user\", \"content\": \"Hello\"}]}'"
echo; echo "== a request through the gateway, to copy:"
echo "$request"
eval "$request"; echo
