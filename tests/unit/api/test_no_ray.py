"""api/ is plain Python: importing it must not import Ray (STYLE: only serve/ knows Ray)."""

from __future__ import annotations

import subprocess
import sys


def test_api_modules_do_not_import_ray():
    code = "import sys, cogvlm_ray.api.chat, cogvlm_ray.api.protocol; sys.exit('ray' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], timeout=120).returncode == 0
