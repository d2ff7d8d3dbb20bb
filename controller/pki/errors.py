"""The PKI package's one exception.

PkiError    a certificate, key, CSR, token or CA directory is unusable; the message
            names the file or field and says what to do
"""

from __future__ import annotations


class PkiError(Exception):
    """Operator-facing: the message names the problem and, where there is one, the remedy."""
