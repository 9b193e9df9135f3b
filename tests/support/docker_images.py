"""Test images built locally (no registry is reachable): ``FROM scratch`` plus busybox.

The image holds only Debian's statically linked busybox (package ``busybox-static``), installed
as ``/bin/busybox`` with its applets linked into ``/bin`` (and an empty ``/tmp``), so
containers can run ``sleep``, ``httpd``, ``sh`` and ``test``.  It is built once and reused:
:func:`ensure_busybox_image` builds only when the tag is missing or was built from another
Dockerfile.  A missing busybox or Docker engine is an error (the
tests that need them fail; `make test` installs both).
"""

from __future__ import annotations

import fcntl
import hashlib
import shutil
import subprocess
import tempfile
from pathlib import Path

__all__ = ["BUSYBOX_IMAGE", "ensure_busybox_image"]

BUSYBOX_IMAGE = "flux-test/busybox:latest"

_DOCKERFILE = """\
FROM scratch
COPY busybox /bin/busybox
RUN ["/bin/busybox", "--install", "-s", "/bin"]
RUN ["/bin/busybox", "mkdir", "-m", "1777", "/tmp"]
CMD ["/bin/sh"]
"""

# The image records which Dockerfile built it, so a changed Dockerfile means a rebuild.
_RECIPE = hashlib.sha256(_DOCKERFILE.encode()).hexdigest()[:16]
_RECIPE_LABEL = "flux-test.recipe"

# Only the static build works in an image without a libc.
_BUSYBOX_CANDIDATES = ("/bin/busybox", "/usr/bin/busybox")


def _image_exists(tag: str) -> bool:
    label_format = f'{{{{index .Config.Labels "{_RECIPE_LABEL}"}}}}'
    result = subprocess.run(
        ["docker", "image", "inspect", "--format", label_format, tag],
        capture_output=True,
        text=True,
        timeout=60,
    )
    return result.returncode == 0 and result.stdout.strip() == _RECIPE


def _static_busybox() -> Path:
    for candidate in _BUSYBOX_CANDIDATES:
        path = Path(candidate)
        if path.is_file():
            file_type = subprocess.run(
                ["file", "-bL", str(path)], capture_output=True, text=True, timeout=10
            ).stdout if shutil.which("file") else "statically linked"
            if "dynamically linked" not in file_type:
                return path
    raise RuntimeError(
        "no statically linked busybox found in /bin or /usr/bin: "
        "install Debian's busybox-static (`make test` does)"
    )


def ensure_busybox_image(tag: str = BUSYBOX_IMAGE) -> str:
    """Return ``tag`` after building the busybox image if Docker does not have it yet."""
    if shutil.which("docker") is None:
        raise RuntimeError("the docker CLI is not installed: run `make test`")
    if _image_exists(tag):
        return tag
    # Concurrent test processes would otherwise build the same image twice.
    lock_path = Path(tempfile.gettempdir()) / "flux-test-busybox-image.lock"
    with open(lock_path, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if _image_exists(tag):
            return tag
        with tempfile.TemporaryDirectory(prefix="flux-busybox-") as context:
            shutil.copy2(_static_busybox(), Path(context) / "busybox")
            (Path(context) / "Dockerfile").write_text(_DOCKERFILE)
            result = subprocess.run(
                ["docker", "build", "-q", "--label", f"{_RECIPE_LABEL}={_RECIPE}", "-t", tag,
                 context],
                capture_output=True,
                text=True,
                timeout=300,
            )
        if result.returncode != 0:
            raise RuntimeError(f"docker build of {tag} failed: {result.stderr.strip()}")
    return tag
