"""Make the role's filter plugin importable as a plain module.

Ansible loads filter_plugins by path, not as a package, so the tests do the same
instead of requiring the role to be installed as a collection.
"""

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
FILTER_PLUGINS = REPO / "roles" / "model_registry" / "filter_plugins"

if str(FILTER_PLUGINS) not in sys.path:
    sys.path.insert(0, str(FILTER_PLUGINS))
