#!/usr/bin/env bash
# README command (2): the whole test suite, set-up included.
#   lint      yamllint, ansible-lint (production profile)
#   unit      pytest tests/unit: plugins and the test backend, no nginx
#   nginx     pytest tests/nginx: the gateway role rendered and run by this host's nginx
#   molecule  every scenario on Debian 12 and Debian 13 (testinfra verifier)
# MOLECULE_DISTROS and MOLECULE_SCENARIOS narrow the molecule runs for a fast loop,
# e.g. MOLECULE_DISTROS=bookworm MOLECULE_SCENARIOS=default scripts/test.sh
set -euo pipefail
cd "$(dirname "$0")/.."

scenarios=${MOLECULE_SCENARIOS:-$(cd molecule && ls -d */ | tr -d / | grep -v '^shared$' | tr '\n' ' ')}
# The model_servers scenario's docker host loads images built on this machine.
case " $scenarios " in *" model_servers "*) export LAB_MODEL_IMAGES=1 ;; esac
scripts/setup.sh
export PATH="$PWD/.venv/bin:$PATH"
export ANSIBLE_FORCE_COLOR=0 PY_COLORS=0

declare -a summary=()
run_step() {
  local name=$1 start=$SECONDS
  shift
  printf '\n== %s: %s\n' "$name" "$*"
  if "$@"; then
    summary+=("ok      $(printf '%4ss' $((SECONDS - start)))  $name")
  else
    summary+=("FAILED  $(printf '%4ss' $((SECONDS - start)))  $name")
    print_summary
    exit 1
  fi
}
print_summary() {
  local failed
  failed=$(printf '%s\n' "${summary[@]}" | grep -c '^FAILED' || true)
  printf '\n== summary\n'
  printf '%s\n' "${summary[@]}"
  printf 'steps: %s passed, %s failed\n' $((${#summary[@]} - failed)) "$failed"
}

run_step "yamllint" yamllint --strict .
run_step "ansible-lint (production profile)" ansible-lint --profile production
run_step "pytest unit tests" python -m pytest -q tests/unit
run_step "pytest nginx tests" python -m pytest -q tests/nginx

for distro in ${MOLECULE_DISTROS:-bookworm trixie}; do
  for scenario in $scenarios; do
    run_step "molecule $scenario on $distro" env MOLECULE_DISTRO="$distro" molecule test -s "$scenario"
  done
done
print_summary
