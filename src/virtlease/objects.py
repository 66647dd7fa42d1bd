"""Lock objects: one per VM, validated and kept in a legal order.

A :class:`LockObject` wraps a driver's object.  It checks every argument and
every call order (the rules of libvirt's lock manager) before the driver is
called, so drivers only ever see valid requests.

Life cycle of one object (a handle; what is *held* belongs to the domain's
owner on the host, so a fresh object may release or inquire what an earlier
one of the same domain took — libvirt's pattern)::

    NEW --acquire--> HELD --release--> RELEASED --acquire--> HELD ...
    NEW --release--> RELEASED          (the owner's holdings of its resources)
    NEW --acquire(REGISTER_ONLY)--> REGISTERED --acquire--> HELD
    HELD --prepare_migrate--> MIGRATING --complete_migrate_out--> GONE
    any --free--> FREED                (never releases)

See docs/DESIGN.md §3 (The ABI).
"""

from __future__ import annotations

import enum
import logging
import threading
from collections.abc import Callable
from types import TracebackType
from typing import Any, cast

from .abi import (
    AcquireFlags,
    Capability,
    DriverObject,
    FailureAction,
    HeldResource,
    HotplugObject,
    MigrateObject,
    NewFlags,
    ObjectSpec,
    ResourceFlags,
    ResourceSpec,
    ResourceType,
)
from .errors import CapabilityError, ObjectStateError, ValidationError
from .validation import (
    check_enum,
    check_flags,
    check_host,
    check_resource,
    check_state,
)

log = logging.getLogger(__name__)


class Phase(enum.Enum):
    NEW = "new"
    REGISTERED = "registered"
    HELD = "held"
    RELEASED = "released"
    MIGRATING = "migrating out"
    GONE = "migrated away"
    FREED = "freed"


class LockObject:
    """The locks of one VM.  Obtain from ``Plugin.new_object``.

    Thread-safe: calls on one object are serialised.
    """

    def __init__(self, spec: ObjectSpec, driver_object: DriverObject, *, driver_name: str,
                 capabilities: Capability, on_free: Callable[[LockObject], None]) -> None:
        self._driver_name = driver_name
        self._capabilities = capabilities
        self._on_free = on_free
        self.spec = spec
        self._drv = driver_object
        self._phase = Phase.NEW
        self._restricted = False
        self._resources: list[ResourceSpec] = []
        self._mutex = threading.RLock()

    # -- introspection -----------------------------------------------------

    @property
    def uuid(self) -> str:
        return self.spec.uuid

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def phase(self) -> Phase:
        return self._phase

    @property
    def resources(self) -> list[ResourceSpec]:
        """The resources added so far (a copy)."""
        return list(self._resources)

    def __repr__(self) -> str:
        return f"<LockObject {self.spec.name} {self.spec.uuid} {self._phase.value}>"

    # -- helpers -----------------------------------------------------------

    def _where(self) -> str:
        return f"domain {self.spec.name} ({self.spec.uuid})"

    def _require(self, *phases: Phase, call: str) -> None:
        if self._phase is Phase.FREED:
            raise ObjectStateError(f"{call}: {self._where()} was freed; create a new object")
        if self._phase not in phases:
            allowed = ", ".join(p.value for p in phases)
            raise ObjectStateError(
                f"{call}: {self._where()} is {self._phase.value}; allowed only when {allowed}"
            )

    def _require_capability(self, cap: Capability, call: str) -> None:
        if not self._capabilities & cap:
            raise CapabilityError(
                f"{call} needs capability {cap.name}, which driver {self._driver_name!r} lacks"
            )

    def _make_resource(self, rtype: object, name: object, flags: object, params: object) -> ResourceSpec:
        rtype_c, name_c, params_c = check_resource(rtype, name, params)
        flags_c = check_flags(flags, ResourceFlags)
        for existing in self._resources:
            if existing.type is rtype_c and existing.name == name_c and existing.params.get(
                "lockspace"
            ) == params_c.get("lockspace"):
                raise ValidationError(
                    "resource", f"{name_c!r} was already added to {self._where()}"
                )
        return ResourceSpec(type=rtype_c, name=name_c, flags=flags_c, params=params_c)

    # -- the ABI calls -----------------------------------------------------

    def add_resource(
        self,
        type: ResourceType,
        name: str,
        *,
        flags: ResourceFlags = ResourceFlags(0),
        params: dict[str, Any] | None = None,
    ) -> None:
        """Add a disk (absolute path) or lease (key, ``params["lockspace"]``)
        before the first acquire.  Use ``acquire_resource`` to add one to a
        running object."""
        with self._mutex:
            self._require(Phase.NEW, Phase.RELEASED, Phase.REGISTERED, call="add_resource")
            self._resources.append(self._make_resource(type, name, flags, params))

    def acquire(
        self,
        state: str | None = None,
        *,
        flags: AcquireFlags = AcquireFlags(0),
        action: FailureAction = FailureAction.DEFAULT,
    ) -> None:
        """Take every added resource at once, or none.

        ``state`` resumes what a ``release()``/``inquire()`` described, or
        (for a ``NewFlags.MIGRATE`` object) claims a ``prepare_migrate``
        handoff.  ``action`` runs on the object's pid if the locks are lost.
        """
        with self._mutex:
            if self._restricted:
                raise ObjectStateError(f"acquire: {self._where()} is restricted")
            self._require(Phase.NEW, Phase.RELEASED, Phase.REGISTERED, Phase.MIGRATING, call="acquire")
            if self._phase is Phase.MIGRATING and state is None:
                raise ObjectStateError(
                    f"acquire: {self._where()} is migrating out; only the handback state of the "
                    "destination's complete_migrate_in(cancel=True) can reclaim it"
                )
            state_c = check_state(state)
            flags_c = check_flags(flags, AcquireFlags)
            action_c = check_enum(action, FailureAction, "action")
            if flags_c & AcquireFlags.REGISTER_ONLY and state_c is not None:
                raise ValidationError("state", "REGISTER_ONLY registers the domain and takes no state; "
                                      "pass the state to the acquire that takes the resources")
            if self.spec.flags & NewFlags.MIGRATE and self._phase in (Phase.NEW, Phase.REGISTERED) \
                    and state_c is None and not flags_c & AcquireFlags.REGISTER_ONLY:
                raise ValidationError(
                    "state", f"{self._where()} was created with NewFlags.MIGRATE: its first "
                    "acquire needs the state returned by prepare_migrate on the source"
                )
            self._drv.acquire(list(self._resources), state_c, flags_c, action_c)
            self._phase = Phase.REGISTERED if flags_c & AcquireFlags.REGISTER_ONLY else Phase.HELD
            if flags_c & AcquireFlags.RESTRICT:
                self._restricted = True

    def release(self) -> str:
        """Drop what the domain holds of this object's resources (whichever
        object of the domain took them); return the state to
        ``acquire(state)`` with."""
        with self._mutex:
            if self._restricted:
                raise ObjectStateError(f"release: {self._where()} is restricted")
            self._require(Phase.NEW, Phase.HELD, Phase.REGISTERED, Phase.RELEASED, call="release")
            state: str = self._drv.release(list(self._resources))
            self._phase = Phase.RELEASED
            return state

    def inquire(self) -> str:
        """The state describing what the domain holds now of this object's
        resources (nothing is released)."""
        with self._mutex:
            self._require(Phase.NEW, Phase.HELD, Phase.REGISTERED, Phase.MIGRATING, Phase.RELEASED,
                          call="inquire")
            state: str = self._drv.inquire(list(self._resources))
            return state

    def held(self) -> list[HeldResource]:
        """The resources held now, each with its fencing token (typed; the
        state strings stay opaque).  Empty for a driver that locks nothing."""
        with self._mutex:
            if self._phase is Phase.FREED:
                raise ObjectStateError(f"held: {self._where()} was freed; create a new object")
            return list(self._drv.held(list(self._resources)))

    def acquire_resource(
        self,
        type: ResourceType,
        name: str,
        *,
        flags: ResourceFlags = ResourceFlags(0),
        params: dict[str, Any] | None = None,
    ) -> None:
        """HOTPLUG: take one more resource while holding the others."""
        with self._mutex:
            self._require_capability(Capability.HOTPLUG, "acquire_resource")
            if self._restricted:
                raise ObjectStateError(f"acquire_resource: {self._where()} is restricted")
            self._require(Phase.HELD, call="acquire_resource")
            res = self._make_resource(type, name, flags, params)
            cast(HotplugObject, self._drv).acquire_resource(res)
            self._resources.append(res)

    def release_resource(
        self, type: ResourceType, name: str, *, params: dict[str, Any] | None = None
    ) -> None:
        """HOTPLUG: drop one resource while keeping the others."""
        with self._mutex:
            self._require_capability(Capability.HOTPLUG, "release_resource")
            if self._restricted:
                raise ObjectStateError(f"release_resource: {self._where()} is restricted")
            self._require(Phase.HELD, call="release_resource")
            rtype_c, name_c, params_c = check_resource(type, name, params)
            for res in self._resources:
                if res.type is rtype_c and res.name == name_c and res.params.get(
                    "lockspace"
                ) == params_c.get("lockspace"):
                    cast(HotplugObject, self._drv).release_resource(res)
                    self._resources.remove(res)
                    return
            raise ValidationError("resource", f"{name_c!r} is not a resource of {self._where()}")

    def prepare_migrate(self, dest_host: str) -> str:
        """MIGRATE, source side: mark the held resources for ``dest_host``
        and return the state to carry to it."""
        with self._mutex:
            self._require_capability(Capability.MIGRATE, "prepare_migrate")
            self._require(Phase.NEW, Phase.HELD, call="prepare_migrate")
            dest = check_host(dest_host, "dest_host")
            state: str = cast(MigrateObject, self._drv).prepare_migrate(dest)
            self._phase = Phase.MIGRATING
            return state

    def complete_migrate_out(self, cancel: bool = False) -> None:
        """MIGRATE, source side: forget the object after a successful
        migration, or (``cancel=True``) clear the marks and keep the locks."""
        with self._mutex:
            self._require_capability(Capability.MIGRATE, "complete_migrate_out")
            self._require(Phase.MIGRATING, call="complete_migrate_out")
            cast(MigrateObject, self._drv).complete_migrate_out(bool(cancel))
            self._phase = Phase.HELD if cancel else Phase.GONE

    def complete_migrate_in(self, cancel: bool = False) -> str | None:
        """MIGRATE, destination side: finish, or (``cancel=True``) hand the
        locks back and return the state the source reclaims them with."""
        with self._mutex:
            self._require_capability(Capability.MIGRATE, "complete_migrate_in")
            if not self.spec.flags & NewFlags.MIGRATE:
                raise ObjectStateError(
                    f"complete_migrate_in: {self._where()} was not created with NewFlags.MIGRATE"
                )
            self._require(Phase.HELD, call="complete_migrate_in")
            state: str | None = cast(MigrateObject, self._drv).complete_migrate_in(bool(cancel))
            if cancel:
                self._phase = Phase.GONE
            return state

    def free(self) -> None:
        """Forget the object.  Never releases: what the domain holds stays
        held (libvirt frees the start's object while the VM runs); call
        ``release()`` to drop it."""
        with self._mutex:
            if self._phase is Phase.FREED:
                raise ObjectStateError(f"free: {self._where()} was already freed")
            try:
                self._drv.free()
            finally:
                self._phase = Phase.FREED
                self._on_free(self)

    def __enter__(self) -> LockObject:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._phase is not Phase.FREED:
            self.free()
