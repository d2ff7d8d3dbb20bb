"""Errors of the lab, each carrying one operator-facing message.

LabError
 ├── SpecError       a --host argument (or other input) is malformed; nothing was changed
 ├── StateError      the state file is missing, unreadable, or a lab is already up
 ├── PlumbingError   an `ip` command failed while building or removing the network
 └── DaemonError     the controller, an agent or a listener failed to start or get ready
"""

from __future__ import annotations


class LabError(Exception):
    """Base of every error the lab reports to the operator (without a traceback)."""


class SpecError(LabError):
    """Bad input, named by field; raised before anything is changed."""


class StateError(LabError):
    """The lab's recorded state does not allow the operation."""


class PlumbingError(LabError):
    """A network namespace, link or address could not be created or removed."""


class DaemonError(LabError):
    """A process the lab starts did not come up or did not get ready in time."""
