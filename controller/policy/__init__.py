"""The controller's policy model: resources, label selectors and the ruleset compiler.

Pure logic: no gRPC, no storage. The modules:

    resources  Policy and IPList documents, parse_documents (all or nothing), resource_to_json
    selector   label selector expressions (parse_selector, Selector)
    clauses    policies as clauses (members of one peer list get rules towards another)
    estate     Estate: clauses over workloads, kept current incrementally; compile_rulesets
    peers, ports, addresses, names   the validated field types the resources are made of
    errors     the exception tree
"""

from controller.policy.clauses import Workload, referenced_iplists
from controller.policy.errors import (
    FieldError,
    FieldProblem,
    PolicyError,
    SelectorError,
    ValidationFailed,
)
from controller.policy.estate import Estate, compile_rulesets
from controller.policy.resources import (
    IPList,
    Policy,
    Resource,
    parse_documents,
    resource_to_json,
)
from controller.policy.selector import Selector, parse_selector, selector_from_labels

__all__ = [
    "Estate",
    "FieldError",
    "FieldProblem",
    "IPList",
    "Policy",
    "PolicyError",
    "Resource",
    "Selector",
    "SelectorError",
    "ValidationFailed",
    "Workload",
    "compile_rulesets",
    "parse_documents",
    "parse_selector",
    "referenced_iplists",
    "resource_to_json",
    "selector_from_labels",
]
