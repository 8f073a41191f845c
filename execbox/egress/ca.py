"""The per-installation CA: generated once by execbox, key kept on the host (0600, dir 0700).

Sandboxes receive only the certificate (a file in their working directory); the key
is read by the proxy alone.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

from . import _mitm

__all__ = ["CA_BASENAME", "ensure_ca"]

CA_BASENAME = "mitmproxy"  # the file names mitmproxy's TLS addon reads in its confdir


def ensure_ca(ca_dir: Path) -> str:
    """Create the CA in ``ca_dir`` unless it exists; return the certificate (PEM text)."""
    ca_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(ca_dir, 0o700)
    if not (ca_dir / f"{CA_BASENAME}-ca.pem").exists():
        _mitm.certs.CertStore.create_store(
            ca_dir,
            CA_BASENAME,
            2048,
            organization="execbox",
            cn=f"execbox egress CA ({socket.gethostname()})",
        )
    return (ca_dir / f"{CA_BASENAME}-ca-cert.pem").read_text()
