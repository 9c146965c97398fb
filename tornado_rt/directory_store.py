"""Where a :class:`~tornado_rt.Directory` is kept between restarts.

:class:`DirectoryStore` is the interface: ``load()`` returns the last saved snapshot (the shape of
``PUT /api/directory``) or None when there is none yet; ``save(snapshot)`` replaces it. Both are
called on the IOLoop thread, ``save`` once per change. :class:`FileDirectoryStore` keeps the
snapshot in one JSON file; a store shared by every process (Redis) implements the same two
methods, so ``Directory(store=...)`` does not change.
"""
from __future__ import annotations

import json
import os
import tempfile
from typing import Any, Dict, Mapping, Optional


class DirectoryStoreError(ValueError):
    """The stored snapshot cannot be used (unreadable, not JSON, not a valid directory). The
    message names the file and, for bad JSON, the line and column."""


class DirectoryStore:
    """Interface of a directory store (see the module docstring)."""

    def load(self) -> Optional[Mapping[str, Any]]:
        raise NotImplementedError

    def save(self, snapshot: Mapping[str, Any]) -> None:
        raise NotImplementedError


class FileDirectoryStore(DirectoryStore):
    """The snapshot as one JSON file at ``path``.

    ``save`` is atomic: the snapshot is written to a temporary file in the same directory, flushed
    to disk (``fsync``), renamed over ``path``, and the directory entry is synced too; a crash
    leaves either the old file or the new one, never a torn one. ``load`` returns None when the
    file does not exist, and raises :class:`DirectoryStoreError` naming the file (and the line
    and column of a JSON error) otherwise.
    """

    def __init__(self, path: str):
        self.path = os.path.abspath(path)
        #: Snapshots written since start.
        self.saves = 0

    def load(self) -> Optional[Dict[str, Any]]:
        try:
            with open(self.path, "rb") as fh:
                data = fh.read()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise DirectoryStoreError(f"{self.path}: cannot read: {exc.strerror or exc}") from None
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise DirectoryStoreError(f"{self.path}: not UTF-8 text (byte {exc.start})") from None
        try:
            snapshot = json.loads(text, parse_constant=_reject_constant)
        except json.JSONDecodeError as exc:
            raise DirectoryStoreError(f"{self.path}: line {exc.lineno} column {exc.colno}: "
                                      f"not valid JSON: {exc.msg}") from None
        except (ValueError, RecursionError) as exc:
            raise DirectoryStoreError(f"{self.path}: not valid JSON: {exc}") from None
        if not isinstance(snapshot, dict):
            raise DirectoryStoreError(f"{self.path}: line 1 column 1: the directory must be a JSON object")
        return snapshot

    def save(self, snapshot: Mapping[str, Any]) -> None:
        folder = os.path.dirname(self.path)
        data = json.dumps(snapshot, ensure_ascii=False, sort_keys=True, indent=1).encode("utf-8") + b"\n"
        fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(self.path)}.", suffix=".tmp", dir=folder)
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise
        _fsync_dir(folder)
        self.saves += 1


def _fsync_dir(folder: str) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def load_directory(directory: Any, store: DirectoryStore) -> None:
    """Helper for messages: ``directory.reload()`` with the validation error named like a store
    error (``<file>: <field>: <why>``). Raises :class:`DirectoryStoreError`."""
    try:
        directory.reload()
    except DirectoryStoreError:
        raise
    except ValueError as exc:
        field = getattr(exc, "field", None)
        where = getattr(store, "path", type(store).__name__)
        raise DirectoryStoreError(f"{where}: {field + ': ' if field else ''}{exc}") from None
