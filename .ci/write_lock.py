"""Write the lock file from a virtual environment holding the newest releases (``make lock``).

usage: write_lock.py VENV LOCK
"""

import subprocess
import sys

venv, lock = sys.argv[1], sys.argv[2]
frozen = subprocess.run(
    [f"{venv}/bin/pip", "freeze", "--all", "--exclude-editable"], check=True, capture_output=True, text=True
).stdout.splitlines()
pins = sorted((p for p in frozen if p and not p.lower().startswith("partialize")), key=str.lower)
header = [
    "# Tested versions: what `make demo` / `make test` / CI install (pip install --no-deps -r this file).",
    "# Regenerate with `make lock` (newest releases that work together), then run `make test`.",
    f"# Python {sys.version_info[0]}.{sys.version_info[1]}, x86_64 Linux. pyproject.toml keeps ranges for library users.",
]
with open(lock, "w") as f:
    f.write("\n".join(header + pins) + "\n")
print(f"wrote {lock} ({len(pins)} pins)")
