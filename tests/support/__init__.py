"""What the tests run against and drive, not tests themselves: real etcd members and clusters,
network namespaces, private dockerds, fluxd processes, test backends, and the harnesses and
oracles that more than one test module (or a benchmark, or the fuzz target) shares.
"""
