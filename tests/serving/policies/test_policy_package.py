"""The policies package imports without torch, so the simulator and tools can use it bare."""

from __future__ import annotations

import subprocess
import sys


def test_imports_without_torch() -> None:
    """Importing every policy module loads neither torch nor numpy."""
    code = (
        "import sys, prism.serving.policies as p; "
        "assert 'torch' not in sys.modules and 'numpy' not in sys.modules, sorted(sys.modules); "
        "print(len(p.__all__))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert int(out.stdout) > 0
