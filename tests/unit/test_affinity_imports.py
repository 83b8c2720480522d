from __future__ import annotations

import subprocess
import sys


def test_affinity_core_imports_no_web_stack() -> None:
    """The core stays pure: the middlewares depend on it, never the other way round."""
    code = (
        "import sys\n"
        "import affinity.fingerprint, affinity.rendezvous, affinity.select, affinity.memory\n"
        "import affinity.redis_state, affinity.router, affinity.simulate\n"
        "banned = ('starlette', 'uvicorn', 'aiohttp', 'gateway', 'middleware')\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in banned))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
