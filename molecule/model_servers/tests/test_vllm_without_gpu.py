"""vLLM on a host without a GPU: the role goes as far as it can, and stops at the GPU with a clear error.

vLLM cannot run here (no GPU, no weights). A check-mode run shows the unit the role
would write and the engine it would install, changing nothing; a real run stops at
the GPU preflight, naming the model, before anything is installed or written.
"""

from __future__ import annotations

import pytest

from lab_pytest import play_output, run_playbook

testinfra_hosts = ["ms-gpu1"]

VLLM = {"name": "qwen-chat", "engine": "vllm", "source": "Qwen/Qwen2.5-0.5B-Instruct", "hosts": ["ms-gpu1"],
        "port": 8210, "gpus": [0], "args": ["--max-model-len", "4096"]}
UNIT = "/etc/systemd/system/llm-model-qwen-chat.service"
VENV = "/var/lib/llm/venvs/vllm-0.33.0"


@pytest.fixture(scope="module")
def with_vllm(registry) -> dict:
    return {"llm_models": [*registry, VLLM]}


def test_check_mode_shows_the_vllm_unit_and_changes_nothing(host, with_vllm, address_of, tmp_path):
    result = run_playbook("playbooks/model_servers.yml", tmp_path, with_vllm,
                          "--limit", "ms-gpu1", "--check", "--diff")
    output = play_output(result)
    assert result.returncode == 0, output
    address = address_of("ms-gpu1")
    expected = (f"ExecStart={VENV}/bin/vllm serve Qwen/Qwen2.5-0.5B-Instruct --served-model-name qwen-chat "
                f"--host {address} --port 8210 --max-model-len 4096")
    assert expected in result.stdout
    assert 'Environment="CUDA_VISIBLE_DEVICES=0"' in result.stdout
    assert 'Environment="HF_HUB_OFFLINE=1"' in result.stdout
    assert f"would create {VENV} with vllm==0.33.0" in result.stdout
    assert not host.file(UNIT).exists and not host.file(VENV).exists, "check mode wrote nothing"


def test_without_nvidia_smi_the_preflight_stops_before_any_change(host, with_vllm, tmp_path):
    result = run_playbook("playbooks/model_servers.yml", tmp_path,
                          {**with_vllm, "model_server_gpu_preflight": True}, "--limit", "ms-gpu1")
    assert result.returncode != 0
    assert ("model_server: models qwen-chat need a GPU, but nvidia-smi is missing or fails on host ms-gpu1"
            in " ".join((result.stdout + result.stderr).split())), play_output(result)
    assert not host.file(UNIT).exists and not host.file(VENV).exists
    assert host.service("llm-model-chat-systemd.service").is_running, "the host's other model kept running"
