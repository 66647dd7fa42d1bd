"""``virtlease identity``: what this host locks a disk under, without etcd.

For each PATH that is a disk (a file, a block device): the identity every
host that reaches it shares (its directory's id, a LUN's WWID...), what
this host calls it (its name: the previous release's key), and the etcd
keys a lock takes, with this host's configuration (``identity_map``,
``server_aliases``, ``strict_identity``, ``legacy_path_keys``).  For a PATH
that is a directory: its directory id.  Either way a missing directory id
is created, as the first lock of a disk there would: run it once where a
directory is writable (for a root-squashed NFS export, on the server) so
that hosts that can only read it can lock its disks.  Compare its output
on two hosts to see why they do or do not exclude each other.  Nothing is
sent to etcd; a disk that would be refused exits 2 with the reason.

See docs/DESIGN.md §8 (Resource identity).
"""

from __future__ import annotations

import os
from typing import Any

import click

import virtlease as v
from virtlease.cli.exitcodes import CommandFailed, ExitCode
from virtlease.cli.output import print_json, print_line
from virtlease_etcd.identity import Resolver
from virtlease_etcd.identity.dirid import DirIdError, marker_path, read_or_create
from virtlease_etcd.ops.disks import DiskNames, identity_config

from .options import Settings, etcd_command


def describe(names: DiskNames, path: str) -> dict[str, Any]:
    """What ``path`` is locked under on this host (a directory: its id)."""
    if os.path.isdir(path) and not os.path.islink(path.rstrip("/")):
        try:
            found = read_or_create(path)
        except DirIdError as exc:
            raise CommandFailed(str(exc), code=ExitCode.BAD_INPUT) from None
        return {"path": path, "directory_id": found, "marker": marker_path(path)}
    ((ident, ids),) = names.resolve_many([v.ResourceSpec(v.ResourceType.DISK, path)])
    assert ident is not None
    return {"path": path, "real_path": ident.path, "identity": ident.key, "name": ident.name, "kind": ident.kind,
            "shown": ids[0].readable, "cluster_wide": not ident.fallback,
            "keys": [{"rid": r.rid, "of": "identity" if r.legacy_of is None else "also"} for r in ids]}


@click.command()
@click.argument("paths", nargs=-1, required=True, type=click.Path())
@click.option("--json", "as_json", is_flag=True, help="Print a JSON list, one object per PATH.")
@etcd_command
def identity(settings: Settings, paths: tuple[str, ...], as_json: bool) -> None:
    """Show what each disk PATH is locked under on this host, or a directory's id.

    Creates a directory's id where there is none, as a lock would. Run it on
    two hosts to compare their views of one disk. Contacts no etcd.
    """
    cfg = settings.load()
    names = DiskNames(cfg, Resolver(identity_config(cfg)))
    try:
        found = [describe(names, os.path.abspath(p)) for p in paths]
    finally:
        names.close()
    if as_json:
        print_json(found)
        return
    for f in found:
        if "directory_id" in f:
            print_line(f"{f['path']}: directory id {f['directory_id']} ({f['marker']})")
            continue
        print_line(f"{f['shown']}\n  identity: {f['identity']}"
                  + ("" if f["cluster_wide"] else " (this host's path only: not cluster-wide)")
                  + f"\n  name:     {f['name']} ({f['kind']})\n  keys:     "
                  + ", ".join(f"{k['rid'][:16]}… ({k['of']})" for k in f["keys"]))
