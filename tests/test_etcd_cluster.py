"""The three-member test cluster itself: a quorum forms, survives its leader's death, and a
restarted member catches up on what it missed."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.support.etcd_cluster import EtcdCluster

pytestmark = pytest.mark.etcd


def test_cluster_survives_its_leader(tmp_path: Path) -> None:
    cluster = EtcdCluster(tmp_path)
    try:
        cluster.start()
        assert cluster.endpoints.count(",") == 2
        cluster.etcdctl("put", "/probe", "one")
        cluster.move_leader(2)
        leader = cluster.leader()
        assert leader == 2
        cluster.kill_member(leader)
        assert cluster.leader() != leader
        cluster.etcdctl("put", "/probe", "two")
        cluster.start_member(leader)
        assert cluster.members[leader].get("/probe") == "two"
        cluster.wipe()
        assert cluster.keys("/") == []
    finally:
        cluster.stop()
