"""`make bench`: run every benchmark in bench/ and write its output into bench/RESULTS.md."""

import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
SCRIPTS = ["image_train.py", "flux_train.py", "llm_train.py", "auto_label.py", "multi_process.py", "ops_per_update.py"]

failed = []
for script in SCRIPTS:
    print(f"== {script}", flush=True)
    if subprocess.run([sys.executable, str(HERE / script), "--write"]).returncode:
        failed.append(script)
sys.exit(f"failed: {', '.join(failed)}" if failed else 0)
