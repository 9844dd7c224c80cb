"""One way for every test to load the project's Python: plain modules on sys.path.

Ansible loads filter plugins by path, not as a package, so the tests do the same
(`import llm_registry`, `import gateway_model_patterns`, `import model_server`),
and the shared harness in tests/support is imported the same way.
"""

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PATHS = [REPO / "tests" / "support", *sorted((REPO / "roles").glob("*/filter_plugins"))]

for path in reversed(PATHS):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))
