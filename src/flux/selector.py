"""Selectors: which containers a rule picks, and which instances a query picks.

Theory of operation
-------------------
A rule's selector is a map ``key -> value``; it matches a set of labels when every entry
matches exactly, and a missing label reads as ``""`` (so a selector value of ``""`` matches a
container that lacks the key).  The labels of a container are derived here, purely:

- ``image``: the image reference without tag or digest.  The original split at the last ``:``,
  which broke references with a registry port (``localhost:5000/foo``); we follow Docker's
  grammar instead: a tag is the part after a ``:`` that comes after the last ``/``, and a digest
  is the part after ``@``.
- ``tag``: the tag, ``latest`` when the reference has neither tag nor digest, empty when it is
  pinned by digest alone; ``digest`` is present when the reference carries one.
- ``env.NAME``: the value of environment entry ``NAME`` (everything after the first ``=``, so
  values may themselves contain ``=``; the first entry of a name wins, as in the original).
- any other key: the container label of that name.

Container labels are laid over ``image``/``tag`` as the original did, so a label called
``image`` wins over the parsed reference.

Instances are queried (``fluxctl query``) with the same matching over derived labels: ``host``,
``state`` and ``rule`` plus the instance's own labels.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from flux.model import Instance

__all__ = [
    "ImageRef",
    "container_labels",
    "instance_labels",
    "make_selector",
    "matches",
    "parse_image",
    "parse_pairs",
]


class ImageRef(tuple[str, str, str]):
    """``(image, tag, digest)`` parsed from a Docker image reference."""

    __slots__ = ()

    @property
    def image(self) -> str:
        return self[0]

    @property
    def tag(self) -> str:
        return self[1]

    @property
    def digest(self) -> str:
        return self[2]


def parse_image(reference: str) -> ImageRef:
    """Split ``[registry[:port]/]path[:tag][@digest]`` into image, tag and digest.

    >>> parse_image("localhost:5000/foo:1.2")
    ('localhost:5000/foo', '1.2', '')
    >>> parse_image("foo@sha256:abc")
    ('foo', '', 'sha256:abc')
    """
    name, _, digest = reference.partition("@")
    slash = name.rfind("/")
    colon = name.rfind(":")
    if colon > slash:
        image, tag = name[:colon], name[colon + 1 :]
    else:
        image, tag = name, ""
    if not tag and not digest:
        tag = "latest"
    return ImageRef((image, tag, digest))


def _env_map(env: Iterable[str] | None) -> dict[str, str]:
    values: dict[str, str] = {}
    for entry in env or ():
        # Docker allows an entry without '=' (the variable is unset in the container); it has no
        # value to select on, so it reads as "" like any missing entry.
        name, sep, value = entry.partition("=")
        if sep and name not in values:
            values[name] = value
    return values


def container_labels(
    image: str, labels: Mapping[str, str] | None, env: Iterable[str] | None
) -> dict[str, str]:
    """The labels a selector is evaluated against, and that an instance records."""
    ref = parse_image(image)
    result = {"image": ref.image, "tag": ref.tag}
    if ref.digest:
        result["digest"] = ref.digest
    result.update(labels or {})
    for name, value in _env_map(env).items():
        result[f"env.{name}"] = value
    return result


def matches(selector: Mapping[str, str], labels: Mapping[str, str]) -> bool:
    """True when every selector entry equals the label (a missing label reads as ``""``)."""
    return all(labels.get(key, "") == value for key, value in selector.items())


def instance_labels(instance: Instance) -> dict[str, str]:
    """Labels a query selects instances by: ``host``, ``state``, ``rule`` and the rest."""
    derived = dict(instance.labels or {})
    derived["host"] = instance.host.address
    derived["state"] = str(instance.effective_state)
    derived["rule"] = instance.container_rule
    return derived


def parse_pairs(text: str) -> dict[str, str]:
    """Parse ``k=v,k2=v2`` as fluxctl's ``--labels``/``--env`` do.

    Items are split on ``,``; empty items are skipped; leading spaces of an item are dropped;
    each item splits at its first ``=`` (so values may contain ``=``); a bare ``k`` means
    ``k=k``.  Whitespace inside values is kept.
    """
    pairs: dict[str, str] = {}
    for raw in text.split(","):
        item = raw.lstrip(" ")
        if not item:
            continue
        key, sep, value = item.partition("=")
        pairs[key] = value if sep else key
    return pairs


def make_selector(
    *,
    image: str | None = None,
    tag: str | None = None,
    labels: str | None = None,
    env: str | None = None,
) -> dict[str, str]:
    """Build a selector from fluxctl's flags: labels, then env, then image, then tag."""
    selector: dict[str, str] = {}
    if labels:
        selector.update(parse_pairs(labels))
    if env:
        selector.update({f"env.{key}": value for key, value in parse_pairs(env).items()})
    if image:
        selector["image"] = image
    if tag:
        selector["tag"] = tag
    return selector
