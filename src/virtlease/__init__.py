"""virtlease: cluster-wide disk leases for virtual machines.

Load a lock driver, create one lock object per VM, add its disks, acquire::

    import virtlease
    from virtlease import ResourceType, Capability

    plugin = virtlease.load_driver("etcd", config={"endpoints": "10.0.0.1:2379"},
                                   capabilities=Capability.RESOURCES)
    with plugin.new_object(uuid=vm_uuid, name="web1", pid=qemu_pid) as obj:
        obj.add_resource(ResourceType.DISK, "/var/lib/libvirt/images/web1.qcow2")
        obj.acquire()        # every disk or none; ResourceBusyError names the holder
        ...
        state = obj.release()

See ``virtlease.abi`` for the contract and README.md for the etcd driver.

See docs/DESIGN.md §2 (Layers).
"""

from ._version import __version__ as __version__
from .abi import (
    ABI_VERSION,
    ENTRY_POINT_GROUP,
    AcquireFlags,
    Capability,
    FailureAction,
    HeldResource,
    LockDriver,
    NewFlags,
    ObjectSpec,
    ObjectType,
    ResourceFlags,
    ResourceSpec,
    ResourceType,
    encode_version,
    format_version,
)
from .errors import (
    BackendUnavailableError,
    CapabilityError,
    ConfigError,
    Holder,
    LeaseLostError,
    LockError,
    ObjectStateError,
    PluginBusyError,
    PluginError,
    PluginImportError,
    PluginInitError,
    PluginInvalidError,
    PluginNotFoundError,
    PluginVersionError,
    ResourceBusyError,
    StaleStateError,
    TransactionTooLargeError,
    ValidationError,
    VirtleaseError,
)
from .loader import Plugin, load_driver
from .objects import LockObject, Phase

__all__ = [
    "ABI_VERSION",
    "ENTRY_POINT_GROUP",
    "AcquireFlags",
    "BackendUnavailableError",
    "Capability",
    "CapabilityError",
    "ConfigError",
    "FailureAction",
    "HeldResource",
    "Holder",
    "LeaseLostError",
    "LockDriver",
    "LockError",
    "LockObject",
    "NewFlags",
    "ObjectSpec",
    "ObjectStateError",
    "ObjectType",
    "Phase",
    "Plugin",
    "PluginBusyError",
    "PluginError",
    "PluginImportError",
    "PluginInitError",
    "PluginInvalidError",
    "PluginNotFoundError",
    "PluginVersionError",
    "ResourceBusyError",
    "ResourceFlags",
    "ResourceSpec",
    "ResourceType",
    "StaleStateError",
    "TransactionTooLargeError",
    "ValidationError",
    "VirtleaseError",
    "encode_version",
    "format_version",
    "load_driver",
]
