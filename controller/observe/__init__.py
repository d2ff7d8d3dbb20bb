"""Observed traffic on the controller: flows resolved to workloads, the traffic map, and
policies suggested from what was seen."""

from controller.observe.graph import (
    MapError,
    MapFormatError,
    MapRenderError,
    render_dot,
    write_map,
)
from controller.observe.model import Endpoint, FlowRow, endpoint_name
from controller.observe.suggest import suggest_policies, to_yaml

__all__ = [
    "Endpoint",
    "FlowRow",
    "MapError",
    "MapFormatError",
    "MapRenderError",
    "endpoint_name",
    "render_dot",
    "suggest_policies",
    "to_yaml",
    "write_map",
]
