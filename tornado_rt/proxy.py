"""Requests that came through a trusted reverse proxy.

Behind nginx or Caddy the TCP peer of every request is the proxy, so logs, per-address limits and
the same-host Origin check would see the proxy instead of the client. With
``Settings.trusted_proxies`` (``--trusted-proxy CIDR``, repeatable) a request whose peer address is
in one of those networks has its ``X-Forwarded-For``, ``X-Forwarded-Proto`` and
``X-Forwarded-Host`` applied:

* ``request.remote_ip``: walking ``X-Forwarded-For`` from the right (the proxy nearest to us
  appends last), the first address that is not itself a trusted proxy. Entries that are not IP
  addresses end the walk.
* ``request.protocol``: the last ``X-Forwarded-Proto`` value when it is ``http`` or ``https``.
* ``request.host`` and the ``Host`` header (what the Origin check compares with): the last
  ``X-Forwarded-Host`` value when it looks like a host name with an optional port.

From any other peer these headers are ignored: a client cannot forge its address or host.
Tornado's own ``xheaders=True`` trusts every peer and is therefore not used.
"""
from __future__ import annotations

import functools
import ipaddress
import re
from typing import Any, Iterable, Optional, Sequence, Tuple, Union

from tornado.httputil import split_host_and_port

Network = Union[ipaddress.IPv4Network, ipaddress.IPv6Network]
_HOST = re.compile(r"^(?:\[[0-9a-fA-F:.]+\]|[A-Za-z0-9._-]+)(?::[0-9]{1,5})?$")


def parse_networks(cidrs: Iterable[str]) -> Tuple[Network, ...]:
    """The networks of ``cidrs`` (``10.0.0.0/8``, ``::1``, ``127.0.0.1``). Raises ``ValueError``
    naming the setting and the bad entry."""
    networks = []
    for cidr in cidrs:
        try:
            networks.append(ipaddress.ip_network(str(cidr).strip(), strict=False))
        except ValueError:
            raise ValueError(f"trusted_proxies: {cidr!r} is not an IP address or network "
                             "such as 127.0.0.1 or 10.0.0.0/8") from None
    return tuple(networks)


@functools.lru_cache(maxsize=16)
def _networks(cidrs: Tuple[str, ...]) -> Tuple[Network, ...]:
    return parse_networks(cidrs)


def _address(text: str) -> Optional[Any]:
    text = text.strip()
    if text.startswith("[") and "]" in text:  # [v6]:port
        text = text[1:text.index("]")]
    elif text.count(":") == 1:  # v4:port
        text = text.split(":", 1)[0]
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        return None


def _trusted(address: Any, networks: Sequence[Network]) -> bool:
    if getattr(address, "ipv4_mapped", None) is not None:
        address = address.ipv4_mapped
    return any(address in network for network in networks)


def is_trusted_peer(peer: str, trusted_proxies: Sequence[str]) -> bool:
    """Whether the socket peer ``peer`` is one of ``trusted_proxies`` (addresses or CIDRs)."""
    if not trusted_proxies:
        return False
    address = _address(peer)
    return address is not None and _trusted(address, _networks(tuple(trusted_proxies)))


def client_address(peer: str, forwarded_for: Optional[str], networks: Sequence[Network]) -> str:
    """The client's address: ``peer`` unless it is a trusted proxy, else the rightmost address of
    ``forwarded_for`` that is not a trusted proxy (the leftmost when all are)."""
    address = _address(peer)
    if address is None or not _trusted(address, networks):
        return peer
    client = peer
    for entry in reversed((forwarded_for or "").split(",")):
        hop = _address(entry)
        if hop is None:
            break
        client = str(hop)
        if not _trusted(hop, networks):
            break
    return client


def apply_forwarded(request: Any, trusted_proxies: Sequence[str]) -> None:
    """Apply the ``X-Forwarded-*`` headers of ``request`` (a Tornado ``HTTPServerRequest``) when its
    peer is one of ``trusted_proxies``; otherwise leave it untouched. Called once per request,
    before anything reads the address, protocol or host."""
    if not trusted_proxies:
        return
    networks = _networks(tuple(trusted_proxies))
    peer = request.remote_ip
    address = _address(peer or "")
    if address is None or not _trusted(address, networks):
        return
    headers = request.headers
    request.remote_ip = client_address(peer, headers.get("X-Forwarded-For"), networks)
    proto = headers.get("X-Forwarded-Proto")
    if proto:
        proto = proto.split(",")[-1].strip().lower()
        if proto in ("http", "https"):
            request.protocol = proto
    host = headers.get("X-Forwarded-Host")
    if host:
        host = host.split(",")[-1].strip()
        if _HOST.match(host):
            request.host = host
            request.host_name = split_host_and_port(host.lower())[0]
            headers["Host"] = host


def log_origin_refused(request: Any, origin: str, allowed: Optional[Sequence[str]]) -> None:
    """Count the 403 of a WebSocket handshake and say at info level why: the Origin and what it
    was compared with (the Host, after a trusted proxy's ``X-Forwarded-Host``, or the allowed
    list). Counted as ``tornado_rt_refusals_total{kind="origin"}``; rate-limited per address."""
    from .refusals import refuse

    if allowed is None:
        refuse("origin", "not_same_host", key=request.remote_ip, origin=origin,
               host=request.headers.get("Host"), client=request.remote_ip)
    else:
        refuse("origin", "not_allowed", key=request.remote_ip, origin=origin,
               host=request.headers.get("Host"), allowed=", ".join(allowed), client=request.remote_ip)
