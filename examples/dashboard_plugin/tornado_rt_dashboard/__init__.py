"""A third-party tornado-rt plugin: a ``dashboard`` page and a ``dashboard_widget_updated`` message.

It uses only the public API (``tornado_rt.Plugin``, ``PageType``, ``MessageType``). Install it
(``pip install ./examples/dashboard_plugin``) and every tornado-rt server finds it through the
``tornado_rt.plugins`` entry point; or pass ``plugins=[plugin]`` to ``RealtimeServer``.
"""
from tornado_rt import MessageType, PageType, Plugin, normalize_id


def can_view_dashboard(principal, params, policy):
    """Dashboards belong to workspaces here: ``dashboard_id`` 7 lives in workspace 7's space.

    A real application would look the dashboard up; the rule only has to be a yes/no (or an
    awaitable of one) for this principal."""
    dashboard_id = normalize_id(params["dashboard_id"])
    if principal.user_id is None or dashboard_id is None:
        return False
    return dashboard_id in policy.user_workspaces(principal.user_id)


plugin = Plugin(
    "dashboard",
    page_types=[
        PageType("dashboard", ("dashboard_id",), "dashboard-{dashboard_id}", can_view_dashboard,
                 permission_group="permissions-dashboard-{dashboard_id}"),
    ],
    message_types=[
        MessageType("dashboard_widget_updated", "page", page="dashboard",
                    keys={"dashboard_id": "dashboard_id"}, payload=("dashboard_id", "widget")),
    ],
)
