"""Core plugin: users, workspaces (Baserow's "groups"), applications, notifications.

Message types and their default audiences follow docs/protocol.md §6 and its message catalogue. Side effects
keep the in-memory directory current and revoke pages when a member leaves a workspace. The
presence extension (docs/protocol.md "Extensions") is registered here too: the client action
``presence`` and its server-generated messages.
"""
from typing import Any, Dict

from tornado_rt import MessageType, Plugin
from tornado_rt.presence import presence_action
from tornado_rt.registry import ClientAction


def _add_member(ctx, message):
    if ctx.directory is not None:
        ctx.directory.add_member(message["workspace_id"], message["workspace_user"]["user_id"])


def _remove_member(ctx, message):
    workspace_id = message["workspace_id"]
    user_id = message["workspace_user"]["user_id"]

    def revoke(tables):
        for table_id in tables or ():
            ctx.revoke([user_id], f"permissions-table-{table_id}")
        if ctx.directory is not None:
            ctx.directory.remove_member(workspace_id, user_id)

    return ctx.then(ctx.policy.workspace_tables(workspace_id), revoke)


def _remove_workspace(ctx, message):
    workspace_id = message["workspace_id"]

    def drop(tables):
        for table_id in tables or ():
            ctx.drop_permission_group(f"permissions-table-{table_id}")
        if ctx.directory is not None:
            ctx.directory.remove_workspace(workspace_id)

    return ctx.then(ctx.policy.workspace_tables(workspace_id), drop)


def _remove_user(ctx, message):
    """The user leaves every workspace, losing every table page it had (docs/protocol.md §4)."""
    user_id = message["user_id"]

    def leave(workspaces):
        workspaces = list(workspaces or ())

        def revoke(table_lists):
            for tables in table_lists:
                for table_id in tables or ():
                    ctx.revoke([user_id], f"permissions-table-{table_id}")
            if ctx.directory is not None:
                ctx.directory.remove_user(user_id)

        return ctx.then(ctx.gather(ctx.policy.workspace_tables(ws) for ws in workspaces), revoke)

    return ctx.then(ctx.policy.user_workspaces(user_id), leave)


def _workspace(*payload, key="workspace_id", **kw):
    return dict(audience="workspace", keys={"workspace_id": key}, payload=payload, **kw)


_USER: Dict[str, Any] = dict(audience="user_workspaces", keys={"user_id": "user.id"}, payload=("user",))

plugin = Plugin("core", actions=[ClientAction("presence", presence_action)], message_types=[
    *(MessageType(name, "server") for name in
      ("authentication", "page_add", "page_discard", "force_disconnect",
       "presence", "presence_joined", "presence_left")),
    MessageType("before_group_deleted", **_workspace("workspace_id")),
    MessageType("user_updated", **_USER),
    MessageType("user_deleted", **_USER),
    MessageType("user_restored", **_USER),
    MessageType("user_permanently_deleted", "user_workspaces", keys={"user_id": "user_id"},
                payload=("user_id",), effect=_remove_user),
    MessageType("group_created", **_workspace("workspace", key="workspace.id")),
    MessageType("group_updated", **_workspace("workspace_id", "workspace")),
    MessageType("group_deleted", **_workspace("workspace_id", effect=_remove_workspace)),
    MessageType("group_restored", payload=("workspace_id", "workspace", "applications")),
    MessageType("group_user_added", **_workspace("id", "workspace_id", "workspace_user",
                                                 also_user="workspace_user.user_id", effect=_add_member)),
    MessageType("group_user_updated", **_workspace("id", "workspace_id", "workspace_user")),
    MessageType("group_user_deleted", **_workspace("id", "workspace_id", "workspace_user",
                                                   also_user="workspace_user.user_id", effect=_remove_member)),
    MessageType("application_created", **_workspace("application", key="application.workspace.id")),
    MessageType("application_updated", **_workspace("application_id", "application",
                                                    key="application.workspace.id")),
    MessageType("application_deleted", payload=("application_id",)),
    MessageType("applications_reordered", **_workspace("workspace_id", "order")),
    *(MessageType(name) for name in (
        "user_data_updated", "groups_reordered", "workspace_invitation_updated_or_created",
        "workspace_invitation_accepted", "workspace_invitation_rejected", "job_started",
        "notifications_created", "notifications_fetch_required", "notification_marked_as_read",
        "all_notifications_marked_as_read", "all_notifications_cleared")),
])
