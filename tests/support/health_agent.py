"""The gateway's health agent (roles/gateway/files/llm-gateway-health) loaded as a module.

The agent is installed as a script without a .py suffix, so it is loaded from its path;
registered in sys.modules first, as its dataclasses need.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import sys
from pathlib import Path
from typing import Any

AGENT = Path(__file__).resolve().parents[2] / "roles" / "gateway" / "files" / "llm-gateway-health"


def load() -> Any:
    """The agent's module (loaded once)."""
    name = "llm_gateway_health"
    if name not in sys.modules:
        loader = importlib.machinery.SourceFileLoader(name, str(AGENT))
        spec = importlib.util.spec_from_loader(name, loader)
        assert spec is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        loader.exec_module(module)
    return sys.modules[name]


def config(root: Path, upstreams: list[dict[str, Any]], **overrides: Any) -> dict[str, Any]:
    """An agent configuration with its files under `root`."""
    return {"include_dir": str(root / "upstreams"), "state_file": str(root / "state.json"),
            "drain_file": str(root / "drain.json"), "upstreams": upstreams, **overrides}
