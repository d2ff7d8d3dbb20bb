"""Host specifications of `bulkhead-lab up --host` and the addresses hosts get."""

from __future__ import annotations

import ipaddress

import pytest

from lab.errors import SpecError
from lab.spec import (
    MAX_HOSTS,
    HostSpec,
    host_ipv4,
    host_ipv6,
    parse_host_spec,
    parse_host_specs,
)


def test_name_and_labels_are_parsed() -> None:
    spec = parse_host_spec("web:app=web,env=prod,tier/role=front-1.a_b")
    assert spec == HostSpec("web", {"app": "web", "env": "prod", "tier/role": "front-1.a_b"})
    assert spec.netns == "bh-web"


def test_a_bare_name_has_no_labels() -> None:
    assert parse_host_spec("db2") == HostSpec("db2", {})


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("Web:app=web", "host name: 'Web' must be 1-10 characters"),
        ("1web", "host name: '1web' must be 1-10 characters"),
        ("abcdefghijk", "host name: 'abcdefghijk' must be 1-10 characters"),
        ("we-b", "host name: 'we-b' must be 1-10 characters"),
        ("", "host name: '' must be 1-10 characters"),
        ("ops:app=x", "'ops' is reserved for the operator's console"),
        ("web:", "nothing after ':'"),
        ("web:app", "label 'app' is not key=value"),
        ("web:app=web,", "label '' is not key=value"),
        ("web:=web", "label key '' must start with a letter or digit"),
        ("web:-app=web", "label key '-app' must start with a letter or digit"),
        ("web:app=", "label app: value '' must be 1-63"),
        ("web:app=a b", "label app: value 'a b' must be 1-63"),
        ("web:app=" + "x" * 64, "must be 1-63"),
        ("web:selector=x", "label key 'selector' is reserved"),
        ("web:cidr=x", "label key 'cidr' is reserved"),
        ("web:iplist=x", "label key 'iplist' is reserved"),
        ("web:app=a,app=b", "label key 'app' given twice"),
    ],
)
def test_bad_specs_name_the_argument_and_the_reason(text: str, message: str) -> None:
    with pytest.raises(SpecError) as caught:
        parse_host_spec(text)
    assert f"--host '{text}'" in str(caught.value)
    assert message in str(caught.value)


def test_host_names_must_be_unique() -> None:
    with pytest.raises(SpecError, match="host 'web' given twice"):
        parse_host_specs(["web:app=web", "db", "web"])


def test_at_least_one_host() -> None:
    with pytest.raises(SpecError, match="at least one host"):
        parse_host_specs([])


def test_no_more_hosts_than_addresses() -> None:
    names = [f"h{i}" for i in range(MAX_HOSTS + 1)]
    with pytest.raises(SpecError, match=f"at most {MAX_HOSTS} hosts"):
        parse_host_specs(names)
    assert len(parse_host_specs(names[:MAX_HOSTS])) == MAX_HOSTS


def test_addresses_follow_the_host_index() -> None:
    assert str(host_ipv4(0)) == "198.18.0.10"
    assert str(host_ipv6(0)) == "2001:db8::10"
    assert str(host_ipv4(2)) == "198.18.0.12"
    assert str(host_ipv6(2)) == "2001:db8::12"
    last = MAX_HOSTS - 1
    assert str(host_ipv4(last)) == "198.18.0.254"
    v6 = {host_ipv6(i) for i in range(MAX_HOSTS)}
    assert len(v6) == MAX_HOSTS
    assert all(a in ipaddress.IPv6Network("2001:db8::/64") for a in v6)


@pytest.mark.parametrize("index", [-1, MAX_HOSTS])
def test_addresses_exist_only_for_valid_indexes(index: int) -> None:
    with pytest.raises(SpecError, match="host index"):
        host_ipv4(index)
    with pytest.raises(SpecError, match="host index"):
        host_ipv6(index)
