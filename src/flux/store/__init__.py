"""Where services, rules, instances and hosts are kept: etcd v3, or memory for unit tests."""

from flux.store.base import NotFound, ServiceUpdate, Store, StoreError, StoreUnavailable

__all__ = ["NotFound", "ServiceUpdate", "Store", "StoreError", "StoreUnavailable"]
