"""The agent: this host's Docker containers enrolled as service instances in the store.

``enrol`` is the pure core (containers x services -> instances), ``docker`` the Docker engine
adapter (events, listing, reconcile), ``publish`` the diff-based store writer, and ``agent``
puts them together as supervised components.
"""

from flux.agent.agent import Agent, run_agent
from flux.agent.docker import AiodockerClient, DockerClient, DockerWatcher
from flux.agent.enrol import (
    Container,
    ContainerEvent,
    ContainerUpdate,
    Enroller,
    InstanceKey,
    InstanceUpdate,
    NetworkMode,
)
from flux.agent.publish import Publisher

__all__ = [
    "Agent",
    "AiodockerClient",
    "Container",
    "ContainerEvent",
    "ContainerUpdate",
    "DockerClient",
    "DockerWatcher",
    "Enroller",
    "InstanceKey",
    "InstanceUpdate",
    "NetworkMode",
    "Publisher",
    "run_agent",
]
