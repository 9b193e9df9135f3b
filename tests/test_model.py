"""Records: JSON identical to the original's, validation with one clear line."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from flux.model import (
    Host,
    Instance,
    InstanceState,
    RecordError,
    Rule,
    Service,
    decode_record,
    encode_record,
    format_address,
    parse_address,
    validate_name,
)

# Examples from the original's documentation and code (reference §2.3), as etcd held them.
ORIGINAL_RECORDS = [
    (Service, '{"address":"10.128.0.1:80","instancePort":80,"protocol":"http"}'),
    (Service, "{}"),
    (Service, '{"instancePort":8080}'),
    (Rule, '{"selector":{"image":"weaveworks/hello-world"},"instancePort":8080}'),
    (Rule, '{"selector":{"flux/foo-label":"blorp"}}'),
    (Rule, "{}"),
    (
        Instance,
        '{"host":{"address":"192.168.3.165"},"containerRule":"",'
        '"address":"192.168.3.165:32768","labels":{"image":"nginx","tag":"latest"}}',
    ),
    (Instance, '{"host":{"address":"192.168.3.165"},"containerRule":"default","labels":null}'),
    (
        Instance,
        '{"host":{"address":"10.0.0.2"},"containerRule":"r","address":"10.0.0.2:1",'
        '"labels":{},"state":"draining"}',
    ),
    (Host, '{"address":"192.168.3.165"}'),
    (Host, '{"address":"10.0.0.1","version":"0.1.0","started":"2026-11-23T20:00:00Z"}'),
]


@pytest.mark.parametrize(("cls", "text"), ORIGINAL_RECORDS)
def test_original_records_round_trip(cls: type, text: str) -> None:
    record = decode_record(cls, text)
    assert json.loads(encode_record(record)) == json.loads(text)


def test_session_field_of_the_original_is_tolerated_and_dropped() -> None:
    text = '{"host":{"address":"1.2.3.4"},"containerRule":"","labels":null,"Session":"ABC"}'
    instance = decode_record(Instance, text)
    assert "Session" not in encode_record(instance)


def test_empty_fields_are_omitted() -> None:
    assert encode_record(Service()) == "{}"
    assert encode_record(Service(protocol="tcp")) == '{"protocol":"tcp"}'
    assert encode_record(Rule(selector={"a": "b"})) == '{"selector":{"a":"b"}}'


def test_instance_always_carries_host_rule_and_labels() -> None:
    assert json.loads(encode_record(Instance())) == {
        "host": {"address": ""},
        "containerRule": "",
        "labels": None,
    }


@pytest.mark.parametrize(
    ("instance", "state", "receives"),
    [
        (Instance(address="1.2.3.4:5"), InstanceState.LIVE, True),
        (Instance(), InstanceState.NO_ADDRESS, False),
        (Instance(address="1.2.3.4:5", state=InstanceState.PAUSED), InstanceState.PAUSED, False),
        (Instance(address="1.2.3.4:5", state="unhealthy"), InstanceState.UNHEALTHY, False),
        (Instance(address="1.2.3.4:5", state="draining"), InstanceState.DRAINING, False),
        (Instance(address="1.2.3.4:5", state="live"), InstanceState.LIVE, True),
    ],
)
def test_instance_state(instance: Instance, state: InstanceState, receives: bool) -> None:
    assert instance.effective_state is state
    assert instance.receives_connections is receives


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("{", "spec: not valid JSON"),
        ("[1]", "spec: expected a JSON object, got list"),
        ('"x"', "spec: expected a JSON object, got str"),
        ('{"address":"10.3.4.5"}', "spec: address: invalid address '10.3.4.5': expected IP:port"),
        ('{"address":":80"}', "expected IP:port"),
        ('{"address":"0.0.0.0:80"}', "must not be unspecified"),
        ('{"address":"1.2.3.4:0"}', "port must be 1-65535"),
        ('{"address":"1.2.3.4:99999"}', "port must be 1-65535"),
        ('{"address":"1.2.3.4:http"}', "is not a number"),
        ('{"address":"fe80::1:80"}', "write IPv6 addresses as [IP]:port"),
        ('{"address":"foo:80"}', "'foo' is not an IP address"),
        ('{"instancePort":70000}', "spec: instancePort:"),
        ('{"instancePort":-1}', "spec: instancePort:"),
        ('{"protocol":"udp"}', "spec: protocol:"),
    ],
)
def test_bad_service_records_give_one_line(text: str, message: str) -> None:
    with pytest.raises(RecordError) as info:
        decode_record(Service, text, key="spec")
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_forwarded_is_an_http_services_boolean_omitted_when_off() -> None:
    spec = decode_record(Service, '{"address":"10.0.0.1:80","protocol":"http","forwarded":true}')
    assert spec.forwarded is True
    assert json.loads(encode_record(spec))["forwarded"] is True
    assert decode_record(Service, '{"protocol":"http","forwarded":false}').forwarded is False
    assert "forwarded" not in encode_record(Service(protocol="http", forwarded=False))
    assert decode_record(Service, '{"protocol":"http"}').forwarded is False


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('{"forwarded":true}', "forwarded (X-Forwarded-For) is for http services, not tcp ones"),
        ('{"protocol":"tcp","forwarded":true}', "is for http services, not tcp ones"),
        ('{"protocol":"http","forwarded":"yes"}', "spec: forwarded:"),
        ('{"protocol":"http","forwarded":1}', "spec: forwarded:"),
        ('{"protocol":"http","forwarded":"true"}', "spec: forwarded:"),
    ],
)
def test_bad_forwarded_records_give_one_line(text: str, message: str) -> None:
    with pytest.raises(RecordError) as info:
        decode_record(Service, text, key="spec")
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_bad_rule_and_host_records() -> None:
    with pytest.raises(RecordError, match="selector"):
        decode_record(Rule, '{"selector":{"a":1}}')
    with pytest.raises(RecordError, match="selector keys must not be empty"):
        decode_record(Rule, '{"selector":{"":"x"}}')
    with pytest.raises(RecordError, match="not an IP address"):
        decode_record(Host, '{"address":"nope"}')
    with pytest.raises(RecordError, match="state"):
        decode_record(Instance, '{"state":"sleeping"}')


@pytest.mark.parametrize(
    ("text", "canonical"),
    [
        ("10.0.0.1:80", "10.0.0.1:80"),
        ("[::1]:8080", "[::1]:8080"),
        ("[2001:db8::0001]:1", "[2001:db8::1]:1"),
        ("127.42.0.1:65535", "127.42.0.1:65535"),
    ],
)
def test_addresses_are_canonical(text: str, canonical: str) -> None:
    ip, port = parse_address(text)
    assert format_address(ip, port) == canonical
    assert Service(address=text).address == canonical


@pytest.mark.parametrize(
    "name", ["a", "svc", "my-service", "my_service.v2", "0abc", "x" * 63, "A.B-C_D"]
)
def test_good_names(name: str) -> None:
    assert validate_name(name) == name


@pytest.mark.parametrize(
    "name", ["", "-svc", ".svc", "_svc", "a/b", "a b", "x" * 64, "caf\u00e9", "a:b", "a\nb"]
)
def test_bad_names(name: str) -> None:
    with pytest.raises(RecordError, match="invalid service name"):
        validate_name(name, "service name")


addresses = st.tuples(
    st.ip_addresses(v=4).filter(lambda ip: not ip.is_unspecified), st.integers(1, 65535)
)


@given(addresses, st.integers(0, 65535), st.sampled_from(["", "tcp", "http"]))
def test_service_round_trips(address: tuple, port: int, protocol: str) -> None:
    service = Service(address=format_address(*address), instance_port=port, protocol=protocol)
    assert decode_record(Service, encode_record(service)) == service


@given(
    st.dictionaries(st.text(min_size=1), st.text()),
    st.one_of(st.none(), addresses),
    st.sampled_from(list(InstanceState)),
)
def test_instance_round_trips(labels: dict, address: tuple | None, state: InstanceState) -> None:
    instance = Instance(
        labels=labels,
        address=None if address is None else format_address(*address),
        state=state,
        container_rule="r",
    )
    assert decode_record(Instance, encode_record(instance)) == instance
