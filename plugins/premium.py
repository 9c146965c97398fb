"""Premium plugin: row comments (docs/protocol.md §6 and its message catalogue)."""
from typing import Any, Dict

from tornado_rt import MessageType, Plugin

_COMMENT: Dict[str, Any] = dict(audience="page", page="table", keys={"table_id": "row_comment.table_id"},
                                payload=("row_comment",))

plugin = Plugin("premium", message_types=[
    MessageType("row_comment_created", **_COMMENT),
    MessageType("row_comment_updated", **_COMMENT),
    MessageType("row_comment_deleted", **_COMMENT),
    MessageType("row_comment_restored", **_COMMENT),
    MessageType("row_comments_notification_mode_updated"),
])
