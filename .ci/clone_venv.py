"""Make (or repair) this clone's small virtual environment: no packages of its own but a .pth file
that puts the cached dependencies on its path, and this checkout installed editable. Each clone runs
its own code while all clones share the heavy dependencies. Does nothing when it is up to date.

usage: clone_venv.py VENV DEPS
"""

import hashlib
import os
import pathlib
import shutil
import subprocess
import sys

venv, deps = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2]).resolve()
tag = f"python{sys.version_info[0]}.{sys.version_info[1]}"
marker = venv / ".partialize-deps"
# the editable install depends on the project metadata: redo it when pyproject.toml changes
want = f"{deps}\n{hashlib.sha256(pathlib.Path('pyproject.toml').read_bytes()).hexdigest()[:16]}\n"

if venv.is_symlink():  # the old layout linked .venv to the shared cache: replace the link only
    venv.unlink()
elif venv.exists() and not marker.exists():
    sys.exit(f"error: {venv} exists and was not made by partialize's Makefile; move it away (or run with VENV=...)")

if not (marker.exists() and marker.read_text() == want and (venv / "bin" / "python").exists()):
    if venv.exists():
        shutil.rmtree(venv)
    cached = deps / "lib" / tag / "site-packages"
    if not cached.is_dir():
        sys.exit(f"error: {cached} does not exist; run `make deps` again")
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    # addsitedir (not a bare path line) so the cached packages' own .pth files are processed too
    (venv / "lib" / tag / "site-packages" / "_partialize_deps.pth").write_text(
        f"import site; site.addsitedir({os.fspath(cached)!r})\n"
    )
    pip = [str(deps / "bin" / "python"), "-m", "pip", "--python", str(venv / "bin" / "python")]
    flags = ["-q", "--disable-pip-version-check", "--no-deps", "--no-build-isolation", "-e", "."]
    env = dict(os.environ, PYTHONWARNINGS="ignore")  # setuptools' notes on editable installs
    done = subprocess.run(pip + ["install", *flags], env=env, capture_output=True, text=True)
    if done.returncode:
        sys.stderr.write(done.stdout + done.stderr)
        shutil.rmtree(venv)
        sys.exit("error: installing this checkout into .venv failed (output above)")
    marker.write_text(want)
