"""Cluster-wide disk identity: one key per storage object, on every host.

The public API is :class:`Resolver`, :class:`IdentityConfig`,
:class:`DiskIdentity` and :class:`IdentityError`; see
:mod:`virtlease_etcd.identity.resolver` for the identity forms a caller may
rely on.  The submodules ``mountinfo``, ``network`` and ``blockdev`` are
the parts (parsing, network sources, block devices) and may change.
"""

from .resolver import DiskIdentity, IdentityConfig, IdentityError, Resolver

__all__ = ["DiskIdentity", "IdentityConfig", "IdentityError", "Resolver"]
