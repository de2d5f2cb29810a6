"""Output folders checked before any work starts.

A results folder that is a file, or that cannot be written, would otherwise surface as an OSError
traceback after a run has trained for minutes; checked up front it is one line naming the folder.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from pflbench.errors import UserError


def check_output_folder(path: Path, flag: str = "--results", create: bool = True) -> None:
    """Raise a UserError unless `path` is (or can be made) a folder this process can write to.
    `create=False`: a missing folder is left alone (for commands that only read when it is absent)."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise UserError(f"{flag} {path} is a file; pass a folder")
    if not create and not path.exists():
        return
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):  # a probe: creating the folder is not writing into it
            pass
    except OSError as exc:
        raise UserError(f"cannot write to {flag} {path} ({exc.strerror or exc}); pass a writable folder") from None
