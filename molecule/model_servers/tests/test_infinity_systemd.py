"""Infinity under systemd, installed offline from a wheelhouse into its own venv (the air-gapped way).

Added to the registry for this module only, on the docker host, whose /srv/lab-cache
holds the wheelhouse that also built the lab's Infinity image. Debian 12 only: the
one CPU torch wheel on these machines is for Python 3.11, and Debian 13 has 3.13.
"""

from __future__ import annotations

import math

import openai
import pytest

from lab_pytest import play_output, run_playbook, wait_served

testinfra_hosts = ["ms-gpu2"]

MODEL = {"name": "minilm-venv", "engine": "infinity", "source": "/srv/models/all-minilm-l6-v2",
         "endpoints": ["embeddings"], "hosts": ["ms-gpu2"], "port": 8204}
VENV = "/var/lib/llm/venvs/infinity-0.0.78"
WHEELHOUSE = "/srv/lab-cache/wheelhouse"


@pytest.fixture(scope="module")
def deployed(host, registry, gateway_url, tmp_path_factory):
    """Converge with the venv model added, offline from the wheelhouse.

    No converge takes it away here (it would cost a whole site.yml run): the next module's
    converge (test_removal.py), whose registry lacks it, removes its unit with the others.
    """
    python = host.check_output("python3 -c 'import sys; print(\"%d.%d\" % sys.version_info[:2])'")
    if python != "3.11":
        pytest.skip(f"the lab's CPU torch wheel is for Python 3.11; this host has {python}")
    workdir = tmp_path_factory.mktemp("infinity-venv")
    result = run_playbook("site.yml", workdir, {"llm_models": [*registry, MODEL],
                                                "model_server_pip_wheelhouse": WHEELHOUSE})
    assert result.returncode == 0, play_output(result)
    wait_served(gateway_url, [MODEL])
    return result


def test_engine_venv_is_root_owned_and_came_from_the_wheelhouse(deployed, host):
    venv = host.file(VENV)
    assert venv.is_directory and venv.user == "root"
    installed = host.check_output(f"{VENV}/bin/python -m pip list --format freeze")
    assert "infinity_emb==0.0.78" in installed.replace("-", "_")
    assert "torch==2.13.0+cpu" in installed, "the CPU wheel of the wheelhouse, not PyPI's CUDA build"


def test_unit_runs_infinity_from_the_venv(deployed, host):
    unit = "llm-model-minilm-venv.service"
    assert host.service(unit).is_running
    exec_start = host.check_output(f"systemctl show {unit} -p ExecStart")
    assert f"{VENV}/bin/infinity_emb" in exec_start and "--served-model-name minilm-venv" in exec_start


def test_same_model_same_vectors_under_both_runtimes(deployed, gateway_url):
    client = openai.OpenAI(base_url=f"{gateway_url}/v1", api_key="unused", max_retries=0, timeout=60)
    text = "Model servers run as systemd units or containers."
    [venv_vector] = [d.embedding for d in client.embeddings.create(model="minilm-venv", input=[text]).data]
    [docker_vector] = [d.embedding for d in client.embeddings.create(model="minilm", input=[text]).data]
    assert len(venv_vector) == 384
    dot = sum(a * b for a, b in zip(venv_vector, docker_vector))
    assert math.isclose(dot, 1.0, abs_tol=1e-4), f"cosine {dot:.6f}: the two runtimes serve different weights"
