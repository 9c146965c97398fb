"""Access policy: who belongs to which workspace, and who may view which page.

:class:`AccessPolicy` is the interface an embedding application implements on top of its own
database. Every method may be a plain function or ``async``; tornado-rt awaits when it has to and
keeps message order either way. :class:`Directory` is the default in-memory implementation: the
application (or the standalone server's ``PUT /api/directory``) fills it, and the built-in plugins
keep it current from the published events (``group_user_added``, ``group_deleted``,
``table_deleted``, ...).
"""
from __future__ import annotations

import functools
import hmac
import logging
from typing import (Any, Awaitable, Callable, Dict, Hashable, Iterable, Mapping, Optional, Sequence, Set,
                    TypeVar, Union)

from .errors import FieldError, require_id, require_ids
from .principal import Principal, normalize_id

log = logging.getLogger("tornado_rt.directory")

Id = Hashable
MaybeAwaitable = Union[Any, Awaitable[Any]]
_F = TypeVar("_F", bound=Callable[..., Any])


class DirectoryError(FieldError, ValueError):
    """A change of the :class:`Directory` was refused; ``field`` names the bad value (the dotted
    path in a snapshot, e.g. ``"workspaces.7"``, or the argument, e.g. ``"table_id"``)."""


class AccessPolicy:
    """Interface between tornado-rt and the application's idea of membership and visibility.

    Ids passed in are canonical (:func:`tornado_rt.principal.normalize_id`); ids returned may be
    ints or strings and are normalized by the caller. Methods may return awaitables.
    """

    def workspace_members(self, workspace_id: Id) -> MaybeAwaitable:
        """User ids of the current members of a workspace (empty when unknown)."""
        raise NotImplementedError

    def user_workspaces(self, user_id: Id) -> MaybeAwaitable:
        """Workspace ids the user is a member of."""
        raise NotImplementedError

    def table_workspace(self, table_id: Id) -> MaybeAwaitable:
        """Workspace id of a table, or None when unknown."""
        raise NotImplementedError

    def workspace_tables(self, workspace_id: Id) -> MaybeAwaitable:
        """Table ids of a workspace (used to revoke pages when a member leaves)."""
        raise NotImplementedError

    def can_view_table(self, principal: Principal, table_id: Id) -> MaybeAwaitable:
        raise NotImplementedError

    def can_view_row(self, principal: Principal, table_id: Id, row_id: Id) -> MaybeAwaitable:
        """Default: whoever may view the table may view its rows."""
        return self.can_view_table(principal, table_id)

    def can_view_public_view(self, slug: str, token: Optional[str]) -> MaybeAwaitable:
        raise NotImplementedError


def _persisted(method: _F) -> _F:
    """Save the directory to its store once the outermost mutation returns (a mutation calling
    others saves once)."""
    @functools.wraps(method)
    def wrapper(self: "Directory", *args: Any, **kwargs: Any) -> Any:
        if self._store is None and self._listener is None:
            return method(self, *args, **kwargs)
        self._depth += 1
        try:
            return method(self, *args, **kwargs)
        finally:
            self._depth -= 1
            if self._depth == 0:
                if self._store is not None:
                    self._save()
                if self._listener is not None:
                    self._listener()
    return wrapper  # type: ignore[return-value]


class Directory(AccessPolicy):
    """In-memory directory: workspaces -> members, tables -> workspace, public views.

    Snapshot form (also the body of ``PUT /api/directory``)::

        {"workspaces": {"1": [10, 11]}, "tables": {"7": 1},
         "public_views": {"abc123": {"table_id": 7, "token": null}}}

    A user may view a table when it belongs to a workspace the user is a member of; a row when its
    table is viewable; a public view when its slug exists and, if it has a token (password), the
    given token matches (compared in constant time).

    Not thread-safe: use it on the IOLoop thread (the server's publish path already does).

    ``store``: a :class:`~tornado_rt.directory_store.DirectoryStore` (e.g.
    :class:`~tornado_rt.directory_store.FileDirectoryStore`) that makes the directory survive a
    restart: the directory is loaded from it here (a store without a snapshot yet is given the
    empty one, which proves it writable), every change is saved to it once the outermost mutation
    returns, and :meth:`reload` reads it again. A failed save is logged and counted
    (``save_failures``, ``last_save_error``); the directory in memory stays current.
    """

    def __init__(self, snapshot: Optional[Mapping[str, Any]] = None, *, store: Any = None):
        self._members: Dict[Id, Set[Id]] = {}
        self._user_workspaces: Dict[Id, Set[Id]] = {}
        self._tables: Dict[Id, Id] = {}
        self._workspace_tables: Dict[Id, Set[Id]] = {}
        self._views: Dict[str, tuple] = {}
        # table -> slugs of its public views: deleting a table (or a workspace of 500) must not
        # scan every view once per table (issue 10, item 6)
        self._table_views: Dict[Id, Dict[str, None]] = {}  # (ordered sets)
        self._depth = 0
        self._store = None
        self._listener: Optional[Callable[[], None]] = None
        self.save_failures = 0
        self.last_save_error: Optional[str] = None
        if snapshot:
            self.load(snapshot)
        if store is not None:
            stored = store.load()
            if stored is not None:
                self.load(stored)
            self._store = store
            if stored is None:
                store.save(self.snapshot())

    @property
    def store(self) -> Any:
        """The store this directory is saved to, or None."""
        return self._store

    def reload(self) -> None:
        """Replace the directory with the store's snapshot (without saving it back). Raises what
        the store raises, or ``ValueError`` for an invalid snapshot; the directory is then unchanged."""
        if self._store is None:
            raise ValueError("this directory has no store to reload from")
        stored = self._store.load()
        self._depth += 1  # no save of what was just read
        try:
            self.load(stored if stored is not None else {})
        finally:
            self._depth -= 1

    def watch(self, listener: Optional[Callable[[], None]]) -> None:
        """Call ``listener()`` after every change (once per outermost mutation, like a save); the
        Redis broker uses it to keep the cluster's snapshot current. None: stop."""
        self._listener = listener

    def load_quietly(self, snapshot: Mapping[str, Any]) -> None:
        """:meth:`load` without saving to the store nor telling the listener (the snapshot came
        from where they would write it)."""
        self._depth += 1
        try:
            self.load(snapshot)
        finally:
            self._depth -= 1

    def apply(self, operation: str, args: Sequence[Any]) -> None:
        """Run one directory operation by name (see :data:`DIRECTORY_OPERATIONS`): how a change
        carried by the broker (a ``directory`` envelope) is applied by every process."""
        if operation not in DIRECTORY_OPERATIONS:
            raise DirectoryError(f"unknown directory operation {operation!r}", "operation")
        getattr(self, operation)(*args)

    @staticmethod
    def check(operation: str, args: Sequence[Any]) -> None:
        """Validate an operation before it is published (on an empty scratch directory): raises
        the :class:`DirectoryError` naming the field that :meth:`apply` would raise."""
        if operation not in DIRECTORY_OPERATIONS:
            raise DirectoryError(f"unknown directory operation {operation!r}", "operation")
        if len(args) > DIRECTORY_OPERATIONS[operation]:
            raise DirectoryError(f"{operation} takes at most {DIRECTORY_OPERATIONS[operation]} arguments",
                                 "operation")
        Directory().apply(operation, args)

    def _save(self) -> None:
        try:
            self._store.save(self.snapshot())  # type: ignore[union-attr]
        except Exception as exc:
            self.save_failures += 1
            self.last_save_error = str(exc)
            log.error("could not save the directory: %s", exc)
        else:
            self.last_save_error = None

    # --- AccessPolicy --------------------------------------------------------------------------
    def workspace_members(self, workspace_id: Id) -> Set[Id]:
        return self._members.get(workspace_id, set())

    def user_workspaces(self, user_id: Id) -> Set[Id]:
        return self._user_workspaces.get(user_id, set())

    def table_workspace(self, table_id: Id) -> Optional[Id]:
        return self._tables.get(table_id)

    def workspace_tables(self, workspace_id: Id) -> Set[Id]:
        return self._workspace_tables.get(workspace_id, set())

    def can_view_table(self, principal: Principal, table_id: Id) -> bool:
        if principal.user_id is None:
            return False
        workspace = self._tables.get(table_id)
        return workspace is not None and principal.user_id in self._members.get(workspace, ())

    def can_view_public_view(self, slug: str, token: Optional[str]) -> bool:
        view = self._views.get(slug)
        if view is None:
            return False
        expected = view[1]
        if expected is None:
            return True
        if not isinstance(token, str):
            return False
        return hmac.compare_digest(expected.encode(), token.encode())

    # --- mutation API ---------------------------------------------------------------------------
    @_persisted
    def set_workspace(self, workspace_id: Any, member_ids: Iterable[Any] = ()) -> None:
        """Create or replace a workspace with exactly these members."""
        ws = _id(workspace_id, "workspace_id")
        for user in self._members.pop(ws, set()):
            self._user_workspaces.get(user, set()).discard(ws)
        self._members[ws] = set()
        for user in member_ids:
            self.add_member(ws, user)

    @_persisted
    def add_member(self, workspace_id: Any, user_id: Any) -> None:
        ws, user = _id(workspace_id, "workspace_id"), _id(user_id, "user_id")
        self._members.setdefault(ws, set()).add(user)
        self._user_workspaces.setdefault(user, set()).add(ws)

    @_persisted
    def remove_member(self, workspace_id: Any, user_id: Any) -> None:
        ws, user = _id(workspace_id, "workspace_id"), _id(user_id, "user_id")
        self._members.get(ws, set()).discard(user)
        spaces = self._user_workspaces.get(user)
        if spaces is not None:
            spaces.discard(ws)
            if not spaces:
                del self._user_workspaces[user]

    @_persisted
    def remove_workspace(self, workspace_id: Any) -> None:
        """Forget a workspace, its memberships and its tables (and their public views)."""
        ws = _id(workspace_id, "workspace_id")
        for user in list(self._members.get(ws, ())):
            self.remove_member(ws, user)
        self._members.pop(ws, None)
        for table in list(self._workspace_tables.get(ws, ())):
            self.remove_table(table)

    @_persisted
    def remove_user(self, user_id: Any) -> None:
        """The user leaves every workspace."""
        user = _id(user_id, "user_id")
        for ws in list(self._user_workspaces.get(user, ())):
            self.remove_member(ws, user)

    @_persisted
    def set_table(self, table_id: Any, workspace_id: Any) -> None:
        table, ws = _id(table_id, "table_id"), _id(workspace_id, "workspace_id")
        old = self._tables.get(table)
        if old is not None:
            self._workspace_tables.get(old, set()).discard(table)
        self._tables[table] = ws
        self._workspace_tables.setdefault(ws, set()).add(table)

    @_persisted
    def remove_table(self, table_id: Any) -> None:
        table = _id(table_id, "table_id")
        ws = self._tables.pop(table, None)
        if ws is not None:
            tables = self._workspace_tables.get(ws)
            if tables is not None:
                tables.discard(table)
                if not tables:
                    del self._workspace_tables[ws]
        for slug in self._table_views.pop(table, ()):
            del self._views[slug]

    @_persisted
    def set_public_view(self, slug: str, table_id: Any = None, token: Optional[str] = None) -> None:
        if not isinstance(slug, str) or not slug:
            raise DirectoryError("slug must be a non-empty string", "slug")
        if token is not None and not isinstance(token, str):
            raise DirectoryError("token must be a string or null", "token")
        table = None if table_id is None else require_id(table_id, "table_id", DirectoryError,
                                                          text="table_id must be an id or null")
        old = self._views.get(slug)
        if old is not None and old[0] != table:
            self._unindex_view(slug, old[0])
        self._views[slug] = (table, token)
        if table is not None:
            self._table_views.setdefault(table, {})[slug] = None

    def _unindex_view(self, slug: str, table: Optional[Id]) -> None:
        slugs = self._table_views.get(table) if table is not None else None
        if slugs is not None:
            slugs.pop(slug, None)
            if not slugs:
                del self._table_views[table]

    def has_public_view(self, slug: str) -> bool:
        """Whether a public view has this slug (tells a bad token from an unknown view in a
        refusal's log line)."""
        return slug in self._views

    def public_views_of_table(self, table_id: Any) -> list:
        """Slugs of the public views of a table."""
        table = normalize_id(table_id)
        return list(self._table_views.get(table, ())) if table is not None else []

    @_persisted
    def remove_public_view(self, slug: str) -> None:
        old = self._views.pop(slug, None)
        if old is not None:
            self._unindex_view(slug, old[0])

    @_persisted
    def clear(self) -> None:
        self._members.clear()
        self._user_workspaces.clear()
        self._tables.clear()
        self._workspace_tables.clear()
        self._views.clear()
        self._table_views.clear()

    @_persisted
    def load(self, snapshot: Mapping[str, Any]) -> None:
        """Replace everything with ``snapshot`` (validated first: on error nothing changes).

        Raises :class:`DirectoryError` (a ``ValueError``) whose ``field`` is the dotted path of the
        bad value.
        """
        fresh = Directory()
        if not isinstance(snapshot, Mapping):
            raise DirectoryError("the directory must be a JSON object", None)
        unknown = set(snapshot) - {"workspaces", "tables", "public_views"}
        if unknown:
            name = sorted(unknown)[0]
            raise DirectoryError(f"unknown key {name!r}", name)
        workspaces = snapshot.get("workspaces") or {}
        if not isinstance(workspaces, Mapping):
            raise DirectoryError("workspaces must be an object of id -> list of user ids", "workspaces")
        for ws, members in workspaces.items():
            where = f"workspaces.{ws}"
            require_id(ws, where, DirectoryError, text="workspace id must be an id")
            fresh.set_workspace(ws, require_ids(members, where, DirectoryError))
        tables = snapshot.get("tables") or {}
        if not isinstance(tables, Mapping):
            raise DirectoryError("tables must be an object of table id -> workspace id", "tables")
        for table, ws in tables.items():
            for value in (table, ws):
                require_id(value, f"tables.{table}", DirectoryError, text="table and workspace ids must be ids")
            fresh.set_table(table, ws)
        views = snapshot.get("public_views") or {}
        if not isinstance(views, Mapping):
            raise DirectoryError("public_views must be an object of slug -> view", "public_views")
        for slug, view in views.items():
            if not isinstance(view, Mapping):
                raise DirectoryError("a public view must be an object", f"public_views.{slug}")
            token = view.get("token")
            if token is not None and not isinstance(token, str):
                raise DirectoryError("token must be a string or null", f"public_views.{slug}.token")
            table_id = view.get("table_id")
            if table_id is not None:
                require_id(table_id, f"public_views.{slug}.table_id", DirectoryError,
                           text="table_id must be an id or null")
            fresh.set_public_view(slug, table_id, token)
        self._members, self._user_workspaces = fresh._members, fresh._user_workspaces
        self._tables, self._workspace_tables, self._views = fresh._tables, fresh._workspace_tables, fresh._views
        self._table_views = fresh._table_views

    def snapshot(self) -> Dict[str, Any]:
        """The directory in its JSON snapshot form (ids as object keys become strings)."""
        return {
            "workspaces": {str(ws): sorted(m, key=str) for ws, m in self._members.items()},
            "tables": {str(t): ws for t, ws in self._tables.items()},
            "public_views": {s: {"table_id": t, "token": tok} for s, (t, tok) in self._views.items()},
        }


#: The operations a ``directory`` envelope may carry, with their largest number of arguments.
DIRECTORY_OPERATIONS: Dict[str, int] = {
    "load": 1, "clear": 0, "set_workspace": 2, "remove_workspace": 1, "add_member": 2,
    "remove_member": 2, "remove_user": 1, "set_table": 2, "remove_table": 1,
    "set_public_view": 3, "remove_public_view": 1,
}


def _id(value: Any, name: str) -> Id:
    return require_id(value, name, DirectoryError, text=f"{name} must be an integer or a non-empty string")
