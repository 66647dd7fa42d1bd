"""The ``nop`` lock driver: locks nothing, supports every capability.

The counterpart of libvirt's ``lock_driver_nop.c``: useful where no locking
is wanted and as the reference every conformance test runs against.  Its
states are empty strings.

See docs/DESIGN.md §2 (Layers).
"""

from __future__ import annotations

from virtlease.abi import (
    ABI_VERSION,
    AcquireFlags,
    Capability,
    FailureAction,
    HeldResource,
    ObjectSpec,
    ResourceSpec,
)


class NopObject:
    """A lock object that records nothing and never conflicts."""

    def __init__(self, spec: ObjectSpec) -> None:
        self.spec = spec

    def acquire(self, resources: list[ResourceSpec], state: str | None,
                flags: AcquireFlags, action: FailureAction) -> None:
        return None

    def release(self, resources: list[ResourceSpec]) -> str:
        return ""

    def inquire(self, resources: list[ResourceSpec]) -> str:
        return ""

    def held(self, resources: list[ResourceSpec]) -> list[HeldResource]:
        return []

    def free(self) -> None:
        return None

    def acquire_resource(self, resource: ResourceSpec) -> None:
        return None

    def release_resource(self, resource: ResourceSpec) -> None:
        return None

    def prepare_migrate(self, dest_host: str) -> str:
        return ""

    def complete_migrate_out(self, cancel: bool) -> None:
        return None

    def complete_migrate_in(self, cancel: bool) -> str | None:
        return "" if cancel else None


class NopDriver:
    """LOCK_DRIVER of the nop plugin.  No load/unload hooks: the loader's
    defaults apply."""

    name = "nop"
    version = ABI_VERSION
    capabilities = (
        Capability.RESOURCES | Capability.MIGRATE | Capability.HOTPLUG | Capability.USES_STATE
    )

    def new_object(self, spec: ObjectSpec) -> NopObject:
        return NopObject(spec)


LOCK_DRIVER = NopDriver
