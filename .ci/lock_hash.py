"""Print a short hash of the lock file and the Python version: the key of the cached dependencies."""

import hashlib
import pathlib
import sys

lock = pathlib.Path(sys.argv[1] if len(sys.argv) > 1 else "requirements/lock.txt")
key = lock.read_bytes() + f"\npython {sys.version_info[0]}.{sys.version_info[1]}\n".encode()
print(hashlib.sha256(key).hexdigest()[:16])
