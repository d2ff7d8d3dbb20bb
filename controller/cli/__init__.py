"""The operator CLI `bulkhead`: a thin client of the controller's AdminService over mutual TLS.

Modules: main (commands), access_commands (tokens, agent revocation, audit), settings
(global options), client (channel and calls), credentials (operator certificate files),
rpc_errors (gRPC errors to one line), documents (YAML loading), labels and durations
(argument parsing), output and tables and describe (formatting), errors.
"""

from __future__ import annotations

import os
import sys


def _quiet_grpc_info_logs() -> None:
    # Unless told otherwise, gRPC's C core logs a failed TLS handshake at INFO level on
    # stderr, next to the CLI's own one-line error saying the same. It reads its log level
    # once, when grpc is first imported: so here, before any CLI module imports it. The
    # variable is removed again so that no child process inherits it.
    if "grpc" in sys.modules or "GRPC_VERBOSITY" in os.environ:
        return
    os.environ["GRPC_VERBOSITY"] = "ERROR"
    try:
        import grpc  # noqa: F401
    finally:
        del os.environ["GRPC_VERBOSITY"]


_quiet_grpc_info_logs()
