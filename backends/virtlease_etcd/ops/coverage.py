"""Does a state string describe this object's disks?  (docs/DESIGN.md
"Disk identity").

A state names each record by its key (``rid``): a disk's identity key and,
with ``legacy_path_keys``, the legacy path key of the path the *source*
used.  Another host may reach the same disk under another path, so its
legacy key differs: a disk is covered when the state lists its identity key
(or, for a state of the previous release, its path key), and the state's
legacy entries of other paths need not match.
"""

from __future__ import annotations

from collections.abc import Sequence

from virtlease.errors import StaleStateError
from virtlease_etcd.model import keyspace as ks
from virtlease_etcd.model import statestring as st

from .domain import Domain


def check_identity(d: Domain, parsed: st.State, rids: Sequence[ks.ResourceId]) -> dict[str, int]:
    """The state must be of this cluster, prefix and domain and describe
    exactly the object's locked resources.  Its host may be another one (the
    state of a released domain resumes elsewhere: libvirt's migration cookie);
    the transaction then checks that nobody holds the disks and nobody was
    granted them since.  Returns :func:`covering`'s tokens."""
    if parsed.prefix != d.cfg.prefix:
        raise StaleStateError(f"state is for prefix {parsed.prefix}, this driver uses {d.cfg.prefix}")
    cluster = d.cluster()
    if parsed.cluster != cluster:
        raise StaleStateError(f"state is from etcd cluster {parsed.cluster}, this is cluster {cluster}")
    if parsed.uuid != d.spec.uuid:
        raise StaleStateError(f"state is for domain {parsed.name} ({parsed.uuid}), not {d.where()}")
    return covering(d, parsed, rids)


def covering(d: Domain, parsed: st.State, rids: Sequence[ks.ResourceId]) -> dict[str, int]:
    """Check that the state describes exactly the object's locked disks and
    return, for every key of the object, the token of the state's entry that
    covers it: the entry of the key itself, or (a key the state does not
    list: this host's legacy path key, or a state of the previous release
    that names a disk by its path key only) the entry of the disk's other key.

    A disk is covered when the state lists its identity key, or lists its
    legacy path key as a key of its own (the previous release's states); the
    state's legacy entries of other paths need not match (the source reached
    the disk under another path).  Raises StaleStateError naming both sides'
    identities otherwise."""
    entries = {(r.rid, r.mode): r for r in parsed.resources}
    own = {(r.rid, r.mode) for r in rids}
    disks: dict[str, list[ks.ResourceId]] = {}
    for r in rids:
        disks.setdefault(r.primary, []).append(r)
    out: dict[str, int] = {}
    uncovered: list[str] = []
    for keys in disks.values():
        token = next((entries[(k.rid, k.mode)].token for k in keys if (k.rid, k.mode) in entries
                      and (k.legacy_of is None or entries[(k.rid, k.mode)].legacy is None)), None)
        if token is None:
            uncovered.append(keys[0].readable)
            continue
        for k in keys:
            out[k.rid] = token
    extra = sorted(r.res for r in parsed.resources if r.legacy is None and (r.rid, r.mode) not in own)
    if uncovered or extra or len(entries) != len(parsed.resources):
        raise StaleStateError(f"state does not describe the resources of {d.where()} (the disks' "
                              f"identities differ): only in state {extra}, only in object {sorted(uncovered)}")
    return out
