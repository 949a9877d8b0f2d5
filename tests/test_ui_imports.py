"""The studio starts without torch: the UI imports no torch at module level (it loads when a job or the hardware
check needs it), so the page is up in seconds."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_ui_imports_no_torch():
    code = "import sys, studio.ui.app; sys.exit(3 if 'torch' in sys.modules else 0)"
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr or "importing studio.ui.app loaded torch"
