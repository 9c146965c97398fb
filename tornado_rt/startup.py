"""What ``tornado-rt serve`` builds at start beyond its options: the access webhook, the types
declared in configuration, the directory kept in a file (and its SIGHUP reload), and the start-up
log of what was loaded. Kept apart from :mod:`tornado_rt.cli` (which only maps the errors to its
one-line refusals): every function takes plain values and raises :class:`StartupError` naming the
option at fault."""
from __future__ import annotations

import logging
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence

from .directory_store import DirectoryStoreError, FileDirectoryStore, load_directory
from .policy import Directory
from .registry import Plugin, entry_point_plugins
from .typesconfig import TypesConfigError, load_types, load_types_file
from .webhook import AccessWebhook

log = logging.getLogger("tornado_rt.cli")


class StartupError(Exception):
    """A refusal to start: ``option`` is the option's name (``types``, ``directory``,
    ``access_pages``) or None for the config file itself."""

    def __init__(self, option: Optional[str], text: str):
        super().__init__(text)
        self.option = option


def access_webhook(values: Mapping[str, Any]) -> Optional[AccessWebhook]:
    """The :class:`AccessWebhook` of ``access_url`` (None without it; ``access_pages`` then refused)."""
    if values.get("access_url") is None:
        if values.get("access_pages"):
            raise StartupError("access_pages", "needs the access webhook (--access-url URL)")
        return None
    return AccessWebhook(values["access_url"], values["api_keys"][0], timeout=values["access_timeout"],
                         cache_ttl=values["access_cache_ttl"], max_concurrency=values["access_concurrency"])


def configured_types(values: Mapping[str, Any], table: Mapping[str, Any], config_file: Optional[str],
                     page_check: Optional[Callable[[str], Any]]) -> List[Plugin]:
    """The plugins declared by the config file's tables and by ``--types FILE``, checked against
    the installed plugins (their names may not be taken, their pages may be routed to).
    ``page_check``: the webhook's ``page_check`` for ``access = "webhook"`` pages (None: refused)."""
    types_file = values.get("types")
    if not table and types_file is None:
        return []
    factory = page_check
    others = entry_point_plugins()
    known = {pt.name: pt for p in others for pt in p.page_types}
    taken = [n for p in others for mt in p.message_types for n in (mt.name, *mt.aliases)]
    plugins: List[Plugin] = []
    try:
        if table:
            plugin = load_types(table, source=config_file or "--config", webhook=factory, known_pages=known,
                                known_messages=taken)
            plugins.append(plugin)
            known.update((pt.name, pt) for pt in plugin.page_types)
            taken += [n for mt in plugin.message_types for n in (mt.name, *mt.aliases)]
        if types_file is not None:
            plugins.append(load_types_file(types_file, webhook=factory, known_pages=known, known_messages=taken))
    except TypesConfigError as exc:
        raise StartupError("types" if exc.source == types_file else None, str(exc)) from None
    return plugins


def guard_pages(server: Any, webhook: Optional[AccessWebhook], pages: Sequence[str]) -> None:
    """Put the registered page types ``pages`` behind the webhook; expose it to ``/metrics``."""
    if webhook is not None and pages:
        try:
            webhook.guard(server.registry, pages)
        except ValueError as exc:
            raise StartupError("access_pages", str(exc)) from None
    server.access_webhook = webhook  # read by the metrics collector


def make_directory(path: Optional[str]) -> Directory:
    """The in-memory directory, kept in the file ``path`` when given (refused when the file is not
    a valid snapshot, with the position of the error: nothing is half-loaded)."""
    if path is None:
        return Directory()
    store = FileDirectoryStore(path)
    try:
        return Directory(store=store)
    except DirectoryStoreError as exc:
        raise StartupError("directory", str(exc)) from None
    except ValueError as exc:  # valid JSON, not a valid directory
        field = getattr(exc, "field", None)
        raise StartupError("directory", f"{store.path}: {field + ': ' if field else ''}{exc}") from None
    except OSError as exc:  # a new file that cannot be written
        raise StartupError("directory", f"cannot write {store.path}: {exc.strerror or exc}") from None


def _counts(directory: Directory) -> str:
    counts: Dict[str, int] = {k: len(v) for k, v in directory.snapshot().items()}
    return f"{counts['workspaces']} workspaces, {counts['tables']} tables, {counts['public_views']} public views"


def reload_directory(directory: Directory) -> None:
    """SIGHUP: read the directory file again; a bad file is logged and the directory kept."""
    store = directory.store
    if store is None:
        log.warning("received SIGHUP: no --directory file to reload; ignored")
        return
    try:
        load_directory(directory, store)
    except (ValueError, OSError) as exc:
        log.error("received SIGHUP: directory NOT reloaded, the current one is kept: %s", exc)
        return
    log.info("received SIGHUP: directory reloaded from %s: %s", store.path, _counts(directory))


def log_startup(server: Any, configured: Sequence[Plugin], directory: Directory,
                webhook: Optional[AccessWebhook]) -> None:
    """Log the plugins, the configured types, the directory file and the access webhook."""
    for plugin in server.registry.plugins.values():
        log.info("plugin %s: %d page types, %d message types", plugin.name, len(plugin.page_types),
                 len(plugin.message_types))
    for plugin in configured:
        log.info("configured types from %s: page types [%s]; message types [%s]", plugin.name.partition(":")[2],
                 ", ".join(pt.name for pt in plugin.page_types), ", ".join(mt.name for mt in plugin.message_types))
    if directory.store is not None:
        log.info("directory loaded from %s: %s", directory.store.path, _counts(directory))
    if webhook is not None:
        from .redaction import redact_url

        guarded = [name for name, pt in server.registry.page_types.items()
                   if getattr(pt.can_add, "__qualname__", "").startswith("AccessWebhook")]
        log.info("access webhook %s decides the pages [%s] (timeout %g s, cache %g s, %d calls at most)",
                 redact_url(webhook.url), ", ".join(guarded), webhook.timeout, webhook.cache_ttl,
                 webhook.max_concurrency)
