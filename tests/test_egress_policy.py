"""Pure unit tests: policy matching, address classification, host map, hooks loading, settings."""

from __future__ import annotations

import asyncio

import pytest
from pydantic import ValidationError

from execbox.egress import EgressHook, NetworkPolicy, Rule, Secret
from execbox.egress.addons.upstream import parse_host_map
from execbox.egress.addresses import forbidden_reason, pick_address
from execbox.egress.hooks import load_hooks
from execbox.egress.policy import decide, host_matches
from execbox.exceptions import ConfigurationError


def P(**kw: object) -> NetworkPolicy:
    return NetworkPolicy(mode="proxy", **kw)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("pattern", "host", "expected"),
    [
        ("api.stripe.com", "api.stripe.com", True),
        ("api.stripe.com", "API.Stripe.com.", True),
        ("api.stripe.com", "evil-api.stripe.com", False),
        ("api.stripe.com", "api.stripe.com.evil.test", False),
        ("*.github.com", "api.github.com", True),
        ("*.github.com", "a.b.github.com", True),
        ("*.github.com", "github.com", False),
        ("*.github.com", "evilgithub.com", False),
        ("*", "anything.test", True),
    ],
)
def test_host_patterns(pattern: str, host: str, expected: bool) -> None:
    assert host_matches(pattern, host) is expected


def test_default_deny_and_mode_none() -> None:
    assert not decide([P()], "a.test", 443, "GET", "/").allowed
    assert decide([NetworkPolicy(allow=["a.test"])], "a.test", 443, "GET", "/").rule == "mode-none"
    assert not decide([], "a.test", 443, "GET", "/").allowed


def test_deny_wins_over_allow() -> None:
    policy = P(allow=["*.example.test"], deny=["bad.example.test"])
    assert decide([policy], "good.example.test", 443, "GET", "/").allowed
    d = decide([policy], "bad.example.test", 443, "GET", "/")
    assert not d.allowed and d.rule == "deny:bad.example.test"


def test_methods_paths_and_ports() -> None:
    policy = P(allow=[Rule(host="api.test", methods=["get"], paths=["/v1/customers"], ports=[443])])
    assert decide([policy], "api.test", 443, "GET", "/v1/customers").allowed
    assert decide([policy], "api.test", 443, "GET", "/v1/customers/cus_1?expand=x").allowed
    assert not decide([policy], "api.test", 443, "GET", "/v1/customersX").allowed
    assert not decide([policy], "api.test", 443, "POST", "/v1/customers").allowed
    assert not decide([policy], "api.test", 80, "GET", "/v1/customers").allowed
    assert not decide([policy], "api.test", 443, "GET", "/v1/customers/../charges").allowed
    assert not decide([policy], "api.test", 443, "GET", "/v1/customers/%2e%2e/charges").allowed
    assert not decide([policy], "api.test", 443, "GET", "/v1/customers%2f..%2fcharges").allowed
    # Tunnel level: host-wide only.
    assert decide([policy], "api.test", 443).allowed
    assert not decide([policy], "other.test", 443).allowed


def test_rule_from_string_with_port_and_validation() -> None:
    rule = Rule.model_validate("api.test:8443")
    assert rule.host == "api.test" and rule.ports == (8443,)
    for bad in ("", "a b", "http://api.test", "*.*.test", "api.test:99999"):
        with pytest.raises(ValidationError):
            Rule.model_validate(bad)
    with pytest.raises(ValidationError):
        Rule(host="a.test", paths=["v1"])
    with pytest.raises(ValidationError):
        Rule(host="a.test", methods=["GET /"])


def test_ceiling_caps_the_request() -> None:
    ceiling, request = P(allow=["a.test"]), P(allow=["a.test", "b.test"])
    assert decide([ceiling, request], "a.test", 443, "GET", "/").allowed
    assert not decide([ceiling, request], "b.test", 443, "GET", "/").allowed


@pytest.mark.parametrize(
    "address",
    [
        "127.0.0.1",
        "10.0.0.1",
        "172.17.0.1",
        "192.168.1.1",
        "169.254.169.254",
        "::1",
        "fe80::1",
        "fd00:ec2::254",
        "::ffff:127.0.0.1",
        "0.0.0.0",
        "100.64.0.1",
        "224.0.0.1",
        "not-an-ip",
    ],
)
def test_forbidden_addresses(address: str) -> None:
    assert forbidden_reason(address) is not None


@pytest.mark.parametrize("address", ["93.184.215.14", "2606:4700::1111", "1.1.1.1"])
def test_public_addresses_pass(address: str) -> None:
    assert forbidden_reason(address) is None


def test_pick_address_refuses_any_private_record() -> None:
    async def mixed(host: str, port: int) -> list[str]:
        return ["93.184.215.14", "10.0.0.5"]

    async def public(host: str, port: int) -> list[str]:
        return ["93.184.215.14"]

    assert asyncio.run(pick_address("x.test", 443, mixed))[0] is None
    assert asyncio.run(pick_address("x.test", 443, public)) == ("93.184.215.14", None)
    assert asyncio.run(pick_address("[::1]", 443, public))[0] is None


def test_host_map_parsing() -> None:
    parsed = parse_host_map({"API.example.test": "127.0.0.1:8081", "b.test:443": "[::1]:9443", "c.test": "127.0.0.2"})
    assert parsed == {
        ("api.example.test", None): ("127.0.0.1", 8081),
        ("b.test", 443): ("::1", 9443),
        ("c.test", None): ("127.0.0.2", None),
    }


class _Hook(EgressHook):
    pass


HOOK_OBJECT = _Hook()


def test_load_hooks_from_objects_classes_and_strings() -> None:
    hooks = load_hooks([HOOK_OBJECT, _Hook, f"{__name__}:HOOK_OBJECT"])
    assert hooks[0] is HOOK_OBJECT and isinstance(hooks[1], _Hook) and hooks[2] is HOOK_OBJECT
    for bad in ("nomodule", "no.such.module:x", f"{__name__}:missing", f"{__name__}:P"):
        with pytest.raises(ConfigurationError):
            load_hooks([bad])


def test_secret_needs_hosts_and_a_real_value() -> None:
    with pytest.raises(ValidationError):
        Secret(value="sk_live_123", hosts=[])
    with pytest.raises(ValidationError):
        Secret(value="abc", hosts=["a.test"])
    assert "sk_live_123" not in repr(Secret(value="sk_live_123", hosts=["a.test"]))


def test_public_api_exports() -> None:
    import execbox.egress as egress

    for name in egress.__all__:
        assert hasattr(egress, name)
