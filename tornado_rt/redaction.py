"""Keeping credentials out of logs and error messages: the one place that knows how.

* :func:`redact_uri` — a request URI (or a bare query string) for an access log: the values of
  query arguments that may carry a credential (:data:`CREDENTIAL_ARGUMENTS`: ``jwt_token``,
  ``token``, ``access_token``, ``api_key``, ``key``, ``password``, ...) become ``[redacted]``.
  Argument names are compared the way the server reads them (percent-decoded, so ``jwt%5Ftoken=`` is caught too), and a value runs
  to the next ``&`` as Tornado parses it (a ``;`` or ``#`` inside the value is hidden with it).
* :func:`redact_url` — a connection URL (the Redis broker's): the password in the user part and
  in a ``password=`` query argument becomes ``***`` (brackets would read as an IPv6 host there).
* :func:`redact_secret` — any text (a traceback) with every occurrence of one known secret
  replaced by ``[redacted]``.
"""
from __future__ import annotations

import re
from urllib.parse import unquote_plus, urlsplit

__all__ = ["REDACTED", "CREDENTIAL_ARGUMENTS", "redact_uri", "redact_url", "redact_secret"]

REDACTED = "[redacted]"
#: Names that may carry a credential (compared lower-cased), the one list for the whole server:
#: query arguments whose values are never logged, a client's subscription parameters shown as
#: ``[redacted]`` (refusals.safe_params, the admin page) and the context keys refusals.refuse()
#: refuses to log.
CREDENTIAL_ARGUMENTS = frozenset({"jwt_token", "token", "access_token", "jwt", "api_key", "key", "key_value",
                                  "secret", "password", "authorization"})

_URL_PASSWORD = "***"
_QUERY_PASSWORD = re.compile(r"([?&;]password=)[^&;#]*", re.IGNORECASE)


def _redact_query(query: str) -> str:
    parts = query.split("&")
    changed = False
    for i, part in enumerate(parts):
        # ';' is not a separator for Tornado, but may be for a proxy: a credential name after one
        # is caught as well, and everything from it to the next '&' is hidden.
        segments = part.split(";")
        for j, segment in enumerate(segments):
            name, equals, _ = segment.partition("=")
            if equals and unquote_plus(name).strip().lower() in CREDENTIAL_ARGUMENTS:
                parts[i] = ";".join(segments[:j] + [f"{name}={REDACTED}"])
                changed = True
                break
    return "&".join(parts) if changed else query


def redact_uri(uri: str) -> str:
    """``uri`` (``/path?query`` or a bare ``query``) with credential-carrying query values
    replaced by ``[redacted]``."""
    if not uri:
        return ""
    path, question, query = uri.partition("?")
    if not question:
        return _redact_query(uri)
    return f"{path}?{_redact_query(query)}"


def redact_url(url: str) -> str:
    """A connection URL with its password (user part or ``password=`` query) replaced by ``***``.
    A URL that cannot be parsed is not shown at all."""
    try:
        parts = urlsplit(url)
        if parts.password is not None:
            host = parts.netloc.rsplit("@", 1)[1]
            url = parts._replace(netloc=f"{parts.username or ''}:{_URL_PASSWORD}@{host}").geturl()
    except ValueError:
        return "<unparsable URL>"
    return _QUERY_PASSWORD.sub(rf"\g<1>{_URL_PASSWORD}", url)


def redact_secret(text: str, secret: str | None) -> str:
    """``text`` with every occurrence of ``secret`` (when given) replaced by ``[redacted]``."""
    return text.replace(secret, REDACTED) if secret else text
