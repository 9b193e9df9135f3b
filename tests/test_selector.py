"""Selector parsing and matching: the pure core of enrolment and of `fluxctl query`."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from flux.model import HostRef, Instance, InstanceState
from flux.selector import (
    container_labels,
    instance_labels,
    make_selector,
    matches,
    parse_image,
    parse_pairs,
)


@pytest.mark.parametrize(
    ("reference", "image", "tag", "digest"),
    [
        ("nginx", "nginx", "latest", ""),
        ("nginx:1.25", "nginx", "1.25", ""),
        ("library/nginx:1.25", "library/nginx", "1.25", ""),
        ("weaveworks/hello-world", "weaveworks/hello-world", "latest", ""),
        ("localhost:5000/foo", "localhost:5000/foo", "latest", ""),
        ("localhost:5000/foo:1.2", "localhost:5000/foo", "1.2", ""),
        ("registry.example:443/a/b/c:v1", "registry.example:443/a/b/c", "v1", ""),
        ("foo@sha256:abcd", "foo", "", "sha256:abcd"),
        ("foo:1.0@sha256:abcd", "foo", "1.0", "sha256:abcd"),
        ("localhost:5000/foo@sha256:abcd", "localhost:5000/foo", "", "sha256:abcd"),
        ("sha256:0123abcd", "sha256", "0123abcd", ""),
    ],
)
def test_parse_image(reference: str, image: str, tag: str, digest: str) -> None:
    assert parse_image(reference) == (image, tag, digest)
    ref = parse_image(reference)
    assert (ref.image, ref.tag, ref.digest) == (image, tag, digest)


def test_container_labels() -> None:
    labels = container_labels(
        "localhost:5000/app:2@sha256:ff",
        {"flux/foo-label": "blorp", "team": "a"},
        ["SERVICE_NAME=boo", "URL=http://x/?a=b=c", "EMPTY=", "NOVALUE", "SERVICE_NAME=dup"],
    )
    assert labels == {
        "image": "localhost:5000/app",
        "tag": "2",
        "digest": "sha256:ff",
        "flux/foo-label": "blorp",
        "team": "a",
        "env.SERVICE_NAME": "boo",
        "env.URL": "http://x/?a=b=c",
        "env.EMPTY": "",
    }


def test_container_label_named_image_wins_over_the_reference() -> None:
    assert container_labels("foo:1", {"image": "bar"}, None)["image"] == "bar"


@pytest.mark.parametrize(
    ("selector", "expected"),
    [
        ({}, True),
        ({"image": "foo-image"}, True),
        ({"image": "foo-image", "tag": "version"}, True),
        ({"image": "foo-image", "tag": "latest"}, False),
        ({"flux/foo-label": "blorp"}, True),
        ({"flux/foo-label": "blorp", "image": "other"}, False),
        ({"env.SERVICE_NAME": "boo"}, True),
        ({"env.SERVICE_NAME": "bo"}, False),
        ({"env.URL": "a=b=c"}, True),
        ({"missing": ""}, True),
        ({"missing": "x"}, False),
    ],
)
def test_matches_container(selector: dict[str, str], expected: bool) -> None:
    labels = container_labels(
        "foo-image:version", {"flux/foo-label": "blorp"}, ["SERVICE_NAME=boo", "URL=a=b=c"]
    )
    assert matches(selector, labels) is expected


def test_includes_from_the_original() -> None:
    # reference §2.9 TestIncludes
    assert matches({"foo": "bar"}, {"foo": "bar"})
    assert matches({"foo": "bar"}, {"bar": "whatever", "foo": "bar"})
    assert not matches({"foo": "nope"}, {"foo": "bar"})


# reference §5.5 TestMakeSelector, with --env fixed to produce env. selectors (§8 item 1)
@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [
        ({}, {}),
        ({"image": "foo/bar"}, {"image": "foo/bar"}),
        ({"tag": "v1"}, {"tag": "v1"}),
        ({"labels": "foo=bar"}, {"foo": "bar"}),
        ({"env": "foo=bar"}, {"env.foo": "bar"}),
        ({"labels": "foo=bar,baz=qux"}, {"foo": "bar", "baz": "qux"}),
        ({"env": "foo=bar,baz=qux"}, {"env.foo": "bar", "env.baz": "qux"}),
        ({"labels": ",,foop=barp,"}, {"foop": "barp"}),
        ({"labels": "image=bar", "image": "foo"}, {"image": "foo"}),
        ({"env": "SERVICE=pages=>borp"}, {"env.SERVICE": "pages=>borp"}),
        ({"labels": ", foo= bar ,"}, {"foo": " bar "}),
        ({"labels": "bare"}, {"bare": "bare"}),
        ({"labels": "a=1", "env": "a=2"}, {"a": "1", "env.a": "2"}),
    ],
)
def test_make_selector(kwargs: dict[str, str], expected: dict[str, str]) -> None:
    assert make_selector(**kwargs) == expected


def test_instance_labels_for_queries() -> None:
    instance = Instance(
        host=HostRef(address="10.0.0.1"),
        container_rule="default",
        address="10.0.0.1:32768",
        labels={"image": "nginx"},
    )
    assert instance_labels(instance) == {
        "image": "nginx",
        "host": "10.0.0.1",
        "state": "live",
        "rule": "default",
    }
    paused = instance.model_copy(update={"state": InstanceState.PAUSED})
    assert matches({"state": "paused"}, instance_labels(paused))
    assert matches({"state": "no address"}, instance_labels(Instance()))


names = st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E, exclude_characters="/:@"))
tags = st.text(
    st.characters(min_codepoint=0x21, max_codepoint=0x7E, exclude_characters="/:@"), min_size=1
)


@given(
    st.one_of(st.just(""), st.sampled_from(["localhost:5000/", "reg.io/", "reg.io:443/ns/"])),
    names.filter(bool),
    st.one_of(st.just(""), tags),
    st.one_of(st.just(""), st.from_regex(r"sha256:[0-9a-f]{8}", fullmatch=True)),
)
def test_parse_image_inverts_composition(registry: str, name: str, tag: str, digest: str) -> None:
    reference = registry + name + (f":{tag}" if tag else "") + (f"@{digest}" if digest else "")
    expected_tag = tag or ("" if digest else "latest")
    assert parse_image(reference) == (registry + name, expected_tag, digest)


@given(st.dictionaries(st.text(min_size=1), st.text()), st.dictionaries(st.text(), st.text()))
def test_a_selector_matches_its_own_labels(selector: dict, extra: dict) -> None:
    assert matches(selector, {**extra, **selector})


@given(st.lists(st.tuples(st.from_regex(r"[A-Za-z_][A-Za-z0-9_]*", fullmatch=True), st.text())))
def test_env_values_keep_everything_after_the_first_equals(entries: list) -> None:
    env = [f"{name}={value}" for name, value in entries]
    labels = container_labels("img", None, env)
    first: dict[str, str] = {}
    for name, value in entries:
        first.setdefault(name, value)
    for name, value in first.items():
        assert labels[f"env.{name}"] == value


@given(
    st.dictionaries(
        st.from_regex(r"[a-z][a-z0-9_.]*", fullmatch=True),
        st.from_regex(r"[a-z0-9 =>]*", fullmatch=True),
    )
)
def test_parse_pairs_round_trips(pairs: dict) -> None:
    text = ",".join(f"{k}={v}" for k, v in pairs.items())
    assert parse_pairs(text) == pairs
