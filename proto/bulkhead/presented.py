"""The certificate a TLS server presents, read without verifying it: enrollment pins the
CA by fingerprint afterwards. Shared by the agent's key tool and the simulator, which
never import each other."""

from __future__ import annotations

import socket
import ssl


def presented_certificate_pem(host: str, port: int, timeout: float) -> str | None:
    """PEM of the certificate HOST:PORT presents (None: it presented none). OSError when
    it cannot be reached. ALPN h2, as a gRPC server expects."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    context.set_alpn_protocols(["h2"])
    with (
        socket.create_connection((host, port), timeout=timeout) as raw,
        context.wrap_socket(raw) as tls,
    ):
        der = tls.getpeercert(binary_form=True)
    return None if der is None else ssl.DER_cert_to_PEM_cert(der)
