"""TLS without a reverse proxy: ``tornado-rt serve --tls-cert FILE --tls-key FILE``.

The server context accepts TLS 1.2 and newer only, with Python's default (modern) cipher
selection. ``reload()`` re-reads both files into the live context on SIGHUP: OpenSSL copies the
certificate and key into each connection when its handshake starts, so connections already open
keep theirs and new handshakes use the renewed pair. The files are first loaded into a throwaway
context, so a half-written or mismatched pair is refused (and logged) without touching the live
context.
"""
from __future__ import annotations

import logging
import ssl
from typing import Tuple

log = logging.getLogger("tornado_rt.tls")


class TLSFileError(Exception):
    """A refusal naming the option at fault: ``option`` is ``"tls_cert"`` or ``"tls_key"``."""

    def __init__(self, option: str, message: str):
        super().__init__(message)
        self.option = option


def _readable(path: str, option: str) -> bytes:
    try:
        with open(path, "rb") as fh:
            return fh.read()
    except OSError as exc:
        raise TLSFileError(option, f"cannot read {path}: {exc.strerror or exc}") from None


def _diagnose(cert_path: str, key_path: str) -> Tuple[str, str]:
    """Which file is at fault when OpenSSL refused the pair, and why."""
    from cryptography import x509
    from cryptography.hazmat.primitives.serialization import load_pem_private_key

    try:
        x509.load_pem_x509_certificate(_readable(cert_path, "tls_cert"))
    except ValueError:
        return "tls_cert", f"{cert_path} is not a PEM certificate"
    try:
        load_pem_private_key(_readable(key_path, "tls_key"), password=None)
    except TypeError:
        return "tls_key", f"{key_path} is encrypted with a password; give an unencrypted key"
    except (ValueError, Exception):  # noqa: B014 - unsupported key types raise other errors
        return "tls_key", f"{key_path} is not a PEM private key"
    return "tls_key", f"{key_path} does not match the certificate in {cert_path}"


def _load(context: ssl.SSLContext, cert_path: str, key_path: str) -> None:
    _readable(cert_path, "tls_cert")
    _readable(key_path, "tls_key")
    try:
        context.load_cert_chain(cert_path, key_path, password=lambda: b"")
    except (ssl.SSLError, ValueError, OSError):
        raise TLSFileError(*_diagnose(cert_path, key_path)) from None


def _new_context() -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    return context


def server_context(cert_path: str, key_path: str) -> ssl.SSLContext:
    """A server ``SSLContext`` (TLS 1.2+) holding the pair. Raises :class:`TLSFileError`."""
    context = _new_context()
    _load(context, cert_path, key_path)
    return context


def reload(context: ssl.SSLContext, cert_path: str, key_path: str) -> bool:
    """Load a renewed pair into the live ``context`` after checking it in a throwaway one.
    Logs the outcome; returns whether the live context changed."""
    try:
        _load(_new_context(), cert_path, key_path)
        context.load_cert_chain(cert_path, key_path, password=lambda: b"")
    except TLSFileError as exc:
        log.error("TLS reload refused, still serving the previous certificate: --%s: %s",
                  exc.option.replace("_", "-"), exc)
        return False
    except (ssl.SSLError, OSError, ValueError) as exc:  # the files changed between the two loads
        log.error("TLS reload failed, still serving the previous certificate: %s", exc)
        return False
    log.info("TLS certificate reloaded from %s", cert_path)
    return True

