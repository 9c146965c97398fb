"""Close codes and refusals used by tornado-rt (documented in docs/protocol.md, "Close codes").

=====  ==========================================================================
code   meaning
=====  ==========================================================================
1001   going away: the server shuts down (after flushing what was published; a backlog not read
       after half the shutdown timeout is discarded at a frame boundary so the close frame goes out)
1002   protocol error (RFC 6455): unmasked frame, reserved bits, unknown opcode, bad control
       frame, stray continuation, 1-byte close payload, a close code a peer may not send
1007   a text message or close reason that is not UTF-8
1009   an incoming message is larger than ``Settings.max_message_size``
1011   internal error while handling this connection (logged, never expected)
1013   try again later: ``Settings.max_connections_per_user`` reached
4001   authentication failed (sent after ``{"type":"authentication","success":false}``)
4003   force disconnect (after ``{"type":"force_disconnect"}``)
4008   policy violation: too many frames per second (every frame counts) or too many
       subscriptions
4009   slow consumer: the connection did not read and its outgoing buffer passed
       ``Settings.max_outgoing_buffer``, or all buffers together passed
       ``Settings.max_total_outgoing_buffer`` and it held the most. No close frame can get through the full buffer, so
       the TCP connection is dropped at once; metrics count it as ``slow_consumer``
=====  ==========================================================================

A peer that misses its pong (``Settings.ping_timeout``) is dropped at once, without waiting for
its answer to Tornado's close frame; metrics count it as ``ping_timeout``.

Refused upgrades (before a WebSocket exists): HTTP 403 for an Origin outside the allow-list,
HTTP 503 when ``Settings.max_connections`` is reached or ``RealtimeServer.shutdown()`` has begun.
"""
GOING_AWAY = 1001
PROTOCOL_ERROR = 1002
INVALID_PAYLOAD = 1007
MESSAGE_TOO_BIG = 1009
INTERNAL_ERROR = 1011
TRY_AGAIN_LATER = 1013
AUTHENTICATION_FAILED = 4001
FORCE_DISCONNECT = 4003
POLICY_VIOLATION = 4008
SLOW_CONSUMER = 4009
