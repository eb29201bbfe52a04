"""Print a short hash of pyproject.toml's dependency lists (the venv cache key)."""

import hashlib
import json
import pathlib
import sys

text = pathlib.Path("pyproject.toml").read_bytes()
try:
    import tomllib

    project = tomllib.loads(text.decode())["project"]
    key = json.dumps(
        [project.get("dependencies"), project.get("optional-dependencies"), sys.version_info[:2]],
        sort_keys=True,
    ).encode()
except ModuleNotFoundError:  # Python 3.10: hash the whole file
    key = text + str(sys.version_info[:2]).encode()
print(hashlib.sha256(key).hexdigest()[:16])
