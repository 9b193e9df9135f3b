"""The test etcd itself works: keys written with etcdctl can be read back, and wiped."""

from tests.support.etcd_server import EtcdServer


def test_etcd_round_trip(etcd: EtcdServer) -> None:
    etcd.etcdctl("put", "/weave-flux/probe", "value")
    assert etcd.get("/weave-flux/probe") == "value"
    assert etcd.keys("/weave-flux/") == ["/weave-flux/probe"]
    etcd.wipe()
    assert etcd.keys("/") == []
