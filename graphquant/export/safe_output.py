"""Output folders that are safe to write: never destroy what graphquant did not write, all or nothing.

``check_output_dir(out, inputs=..., overwrite=...)`` runs *before* the (long) quantization and
refuses, with one line that says what to do:

- a folder that is one of the inputs (or contains one: replacing it would delete the input);
- a path that exists and is not a folder;
- a non-empty folder without graphquant's marker file ``graphquant_export.json`` (a previous
  graphquant output may be replaced; anything else only with ``overwrite=True``);
- a parent folder where nothing can be created.

``atomic_output_dir(out, ...)`` is a context manager that yields a fresh sibling folder
``.<name>.graphquant-tmp-*``; when the block succeeds the marker is written, the old folder (if
any) is renamed aside, the new one renamed in and the old one deleted. When the block fails or is
interrupted (KeyboardInterrupt included) the temporary folder is removed and the previous result
is untouched. Folders and files get the permissions the umask gives (``tempfile.mkdtemp``'s 0700
is widened to match).
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

from ..errors import GraphQuantError

MARKER = "graphquant_export.json"


class OutputDirError(GraphQuantError):
    """An output folder graphquant refuses to write (the message says why and what to do)."""


def _umask() -> int:
    old = os.umask(0)
    os.umask(old)
    return old


def folder_mode() -> int:
    return 0o777 & ~_umask()


def _resolve(p) -> Path:
    return Path(p).expanduser().resolve()


def is_graphquant_output(folder) -> bool:
    return (Path(folder) / MARKER).is_file()


def check_output_dir(out, inputs=(), overwrite: bool = False) -> Path:
    """Refuse unsafe output folders (see the module docstring); returns the resolved path."""
    target = _resolve(out)
    for src in inputs:
        if src is None:
            continue
        s = _resolve(src)
        if s == target:
            raise OutputDirError(f"the output folder {out} is the input model folder; choose another --output_dir")
        if target in s.parents:
            raise OutputDirError(f"the output folder {out} contains the input {src}; replacing it would delete the "
                                 "input: choose another --output_dir")
    if target.exists() and not target.is_dir():
        raise OutputDirError(f"the output path {out} exists and is not a folder; choose another --output_dir")
    if target.is_dir() and any(target.iterdir()) and not is_graphquant_output(target) and not overwrite:
        raise OutputDirError(f"the output folder {out} is not empty and was not written by graphquant (no {MARKER}); "
                             "choose an empty or new folder, or pass --overwrite to replace it")
    parent = target.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        probe = tempfile.mkdtemp(prefix=f".{target.name}.graphquant-probe-", dir=parent)
        os.rmdir(probe)
    except OSError as e:
        raise OutputDirError(f"cannot write next to {out}: {e.strerror or e}; choose a writable --output_dir") from None
    return target


def _apply_umask(folder: Path) -> None:
    """Files some writers create 0600 (safetensors, mkstemp) get the umask's mode, as open() would give."""
    fmode = 0o666 & ~_umask()
    for p in folder.rglob("*"):
        os.chmod(p, folder_mode() if p.is_dir() else fmode)


def _write_marker(folder: Path, info: dict) -> None:
    data = {"written_by": "graphquant", "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **info}
    (folder / MARKER).write_text(json.dumps(data, indent=1, default=str) + "\n")


@contextlib.contextmanager
def atomic_output_dir(out, inputs=(), overwrite: bool = False, marker: dict | None = None):
    """Yield a temporary folder; on success it replaces ``out`` atomically (see the module docstring).

    ``marker``: extra fields for ``graphquant_export.json`` (the block may also add to the dict it
    passed in, e.g. the consumers' caveats found while writing)."""
    target = check_output_dir(out, inputs, overwrite)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.graphquant-tmp-", dir=target.parent))
    old = None
    try:
        os.chmod(tmp, folder_mode())
        yield tmp
        _write_marker(tmp, marker or {})
        _apply_umask(tmp)
        if target.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{target.name}.graphquant-old-", dir=target.parent))
            os.rmdir(old)
            os.rename(target, old)
            try:
                os.rename(tmp, target)
            except BaseException:
                os.rename(old, target)  # put the previous result back
                old = None
                raise
        else:
            os.rename(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
