"""Database plugin: the ``table``, ``row`` and public ``view`` pages, and the table, field, row and
view messages of docs/protocol.md §3 and §6 (and its message catalogue)."""
from tornado_rt import Directory, MessageType, PageType, Plugin, normalize_id
from tornado_rt.hooks import then
from tornado_rt.refusals import Denied


def _table_group(params):
    return f"table-{normalize_id(params['table_id'])}"


def _row_group(params):
    return f"table-{normalize_id(params['table_id'])}-row-{normalize_id(params['row_id'])}"


def _table_permission(params):
    return f"permissions-table-{normalize_id(params['table_id'])}"


# The checks answer a Denied (falsy) with a reason code when they refuse: the session logs and
# counts it (docs/protocol.md, "Refusals in the operator's view"). The reason names what the
# built-in Directory knows; an embedder's policy only says yes or no (access_denied).

def _table_denied(policy, table_id):
    if not isinstance(policy, Directory):
        return Denied("access_denied")
    return Denied("unknown_table" if policy.table_workspace(table_id) is None else "not_a_member")


def _can_view_table(principal, params, policy):
    table_id = normalize_id(params["table_id"])
    if table_id is None:
        return Denied("invalid_parameter", parameter="table_id")
    return then(policy.can_view_table(principal, table_id), lambda ok: ok or _table_denied(policy, table_id))


def _can_view_row(principal, params, policy):
    table_id, row_id = normalize_id(params["table_id"]), normalize_id(params["row_id"])
    if table_id is None or row_id is None:
        return Denied("invalid_parameter", parameter="table_id" if table_id is None else "row_id")
    return then(policy.can_view_row(principal, table_id, row_id), lambda ok: ok or _table_denied(policy, table_id))


def _view_denied(policy, slug):
    if not isinstance(policy, Directory):
        return Denied("access_denied")
    return Denied("bad_token" if policy.has_public_view(slug) else "unknown_view")


def _can_view_public_view(principal, params, policy):
    slug, token = params["slug"], params["token"]
    if not isinstance(slug, str) or (token is not None and not isinstance(token, str)):
        return Denied("invalid_parameter", parameter="slug" if not isinstance(slug, str) else "token")
    return then(policy.can_view_public_view(slug, token), lambda ok: ok or _view_denied(policy, slug))


def _table_created(ctx, message):
    """Published to an explicit workspace, the new table joins that workspace in the directory
    (Baserow's payload does not carry the workspace, so the audience is the only source)."""
    audience = ctx.audience
    table_id = normalize_id(message["table"].get("id")) if isinstance(message["table"], dict) else None
    if (ctx.directory is not None and table_id is not None and audience and audience[0] == "workspaces"
            and len(audience[1]) == 1):
        ctx.directory.set_table(table_id, audience[1][0])


def _table_deleted(ctx, message):
    table_id = normalize_id(message["table_id"])
    ctx.drop_permission_group(f"permissions-table-{table_id}")
    if ctx.directory is not None and table_id is not None:
        for slug in ctx.directory.public_views_of_table(table_id):
            ctx.drop_group(f"view-{slug}")
        ctx.directory.remove_table(table_id)


def _page_table(*payload, key="table_id", **kw):
    return dict(audience="page", page="table", keys={"table_id": key}, payload=payload, **kw)


def _explicit_crud(prefix, obj):
    """view_filter_created / _updated / _deleted and their payload keys."""
    return [
        MessageType(f"{prefix}_created", payload=(obj,)),
        MessageType(f"{prefix}_updated", payload=(f"{obj}_id", obj)),
        MessageType(f"{prefix}_deleted", payload=("view_id", f"{obj}_id")),
    ]


plugin = Plugin(
    "database",
    page_types=[
        PageType("table", ("table_id",), _table_group, _can_view_table, _table_permission, presence=True),
        PageType("row", ("table_id", "row_id"), _row_group, _can_view_row, _table_permission, presence=True),
        PageType("view", ("slug", "token"), "view-{slug}", _can_view_public_view,
                 required=("slug",), anonymous=True),
    ],
    message_types=[
        MessageType("table_created", "table_workspace", keys={"table_id": "table.id"}, payload=("table",),
                    effect=_table_created),
        MessageType("table_updated", "table_workspace", keys={"table_id": "table_id"},
                    payload=("table_id", "table", "force_table_refresh")),
        MessageType("table_deleted", "table_workspace", keys={"table_id": "table_id"},
                    payload=("database_id", "table_id"), effect=_table_deleted),
        MessageType("tables_re_ordered", payload=("database_id", "order"), aliases=("tables_reordered",)),
        MessageType("field_created", **_page_table("field", "related_fields", key="field.table_id")),
        MessageType("field_restored", **_page_table("field", "related_fields", key="field.table_id")),
        MessageType("field_updated", **_page_table("field_id", "field", "related_fields", key="field.table_id")),
        MessageType("field_deleted", **_page_table("table_id", "field_id", "related_fields")),
        MessageType("rows_created", **_page_table("table_id", "rows", "metadata", "before_row_id")),
        MessageType("rows_updated", **_page_table("table_id", "rows_before_update", "rows", "metadata",
                                                  "updated_field_ids")),
        MessageType("rows_deleted", **_page_table("table_id", "row_ids", "rows")),
        MessageType("before_rows_update", **_page_table("table_id", "rows")),
        MessageType("before_rows_delete", **_page_table("table_id", "rows")),
        MessageType("row_history_updated", "page", page="row", keys={"table_id": "table_id", "row_id": "row_id"},
                    payload=("row_history_entry", "table_id", "row_id")),
        MessageType("view_created", **_page_table("view", key="view.table_id")),
        MessageType("view_updated", **_page_table("view_id", "view", key="view.table_id")),
        MessageType("view_deleted", **_page_table("table_id", "view_id")),
        *_explicit_crud("view_filter", "view_filter"),
        *_explicit_crud("view_filter_group", "view_filter_group"),
        *_explicit_crud("view_sort", "view_sort"),
        *_explicit_crud("view_decoration", "view_decoration"),
        *_explicit_crud("view_group_by", "view_group_by"),
        MessageType("view_field_options_updated", payload=("view_id", "field_options")),
        MessageType("views_reordered", **_page_table("table_id", "order")),
        MessageType("row_orders_recalculated", **_page_table("table_id")),
        MessageType("rows_ai_values_generation_error", **_page_table("table_id")),
        MessageType("force_view_rows_refresh"),
        MessageType("force_view_refresh"),
        MessageType("field_rule_created", **_page_table("table_id")),
        MessageType("field_rule_updated", **_page_table("table_id")),
        MessageType("field_rule_deleted", **_page_table("table_id")),
    ],
)
