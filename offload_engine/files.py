"""Writing folders so that a reader never sees a half-written one."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path


def replace_directory(staging: Path, target: Path) -> None:
    """Move the finished ``staging`` folder to ``target``, replacing what was there as a whole.

    Both must be on one file system. An existing ``target`` is first renamed aside, then removed,
    so at every moment ``target`` is either the old folder or the new one.
    """
    if not target.exists():
        os.replace(staging, target)
        return
    aside = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
    os.replace(target, aside / "previous")
    os.replace(staging, target)
    shutil.rmtree(aside, ignore_errors=True)
