"""The one place that imports mitmproxy (its optional dependencies warn at import time)."""

from __future__ import annotations

import warnings

with warnings.catch_warnings():
    # ldap3/passlib (pulled in by mitmproxy's proxyauth addon) raise DeprecationWarnings on import.
    warnings.simplefilter("ignore", DeprecationWarning)
    from mitmproxy import certs, connection, http, options
    from mitmproxy.addons import core, disable_h2c, next_layer, proxyserver, tlsconfig
    from mitmproxy.master import Master
    from mitmproxy.proxy import server_hooks

__all__ = [
    "Master",
    "certs",
    "connection",
    "core",
    "disable_h2c",
    "http",
    "next_layer",
    "options",
    "proxyserver",
    "server_hooks",
    "tlsconfig",
]
