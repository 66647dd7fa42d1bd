"""The misbehaving caller of the nemesis suite: "a state is evidence, never
a credential".

Every host process runs one ``Misuser`` thread (``Settings.misuse``, on by
default).  It gets its hands on states the way a buggy or hostile caller
could, and passes them to ``acquire(state)`` of fresh lock objects:

* the hosts append every state their workers get (``inquire()`` after a
  grant, ``release()``, ``prepare_migrate``) to a gossip file the harness
  creates (``Gossip``, JSON lines, one ``os.write`` each); the misuser tails
  it, so it sees states of its own host's other VMs and of the other hosts;
* ``ResourceBusyError.conflicts`` tells it who holds a disk (host, domain,
  mode, token): enough to forge a state from scratch.

Misuse kinds (``KINDS``), each with variants:

* ``replay``: a gossiped resume state, unchanged, on a fresh object with the
  state's domain UUID (libvirt's migration-cookie pattern: it may succeed
  only if nobody holds the disk and nobody was granted it since the state's
  tokens) or with another UUID;
* ``edited``: the JSON body edited: other host, other uuid, old tokens,
  shared<->exclusive, the ``to`` of a handoff, kind resume<->handoff;
* ``forged``: built from what a ``ResourceBusyError`` shows;
* ``cross``: a handoff state (``prepare_migrate``) claimed by a third host,
  by its source, or by the right host under another UUID.

Every attempt is an event ``misuse`` (kind, variant, outcome, error type).
A success is treated exactly like a real grant: a ``grant`` event with the
tokens from ``held()`` opens a write interval (``via`` ``misuse:KIND/VARIANT``),
the misuser writes to the storage model with them, then ``release()`` and
``free()``.  The checker's unchanged rules then catch any two-holder outcome;
``nemesis.misuse_summary`` labels each success legitimate or not.
"""

from __future__ import annotations

import collections
import hashlib
import json
import os
import random
import secrets
import time
import uuid as uuidlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import virtlease as v
from virtlease_etcd import clock

if TYPE_CHECKING:
    from host_worker import Holding, Host

mono = clock.now
MAGIC = "virtlease-state/1 "
KINDS = ("replay", "edited", "forged", "cross")


class Gossip:
    """A JSON-lines file shared by the hosts of a run: states they saw."""

    def __init__(self, path: str, host: str, inc: int) -> None:
        self.path = path
        self.host = host
        self.inc = inc
        self.wfd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        self.rfh = open(path, "rb")  # tailed for the life of the host
        self.rfh.seek(0, os.SEEK_END)  # only what this incarnation can see happen
        self.partial = b""

    def publish(self, src: str, state: str, uuid: str, name: str, disks: list[str],
                dest: str | None = None) -> None:
        rec = {"t": mono(), "host": self.host, "inc": self.inc, "src": src, "uuid": uuid, "name": name,
               "disks": disks, "dest": dest, "state": state}
        os.write(self.wfd, (json.dumps(rec) + "\n").encode())

    def poll(self) -> list[dict[str, Any]]:
        data = self.partial + self.rfh.read()
        lines = data.split(b"\n")
        self.partial = lines.pop()
        out: list[dict[str, Any]] = []
        for line in lines:
            try:
                rec = json.loads(line)
                rec["body"] = body_of(rec["state"])
            except (ValueError, KeyError, IndexError):
                continue
            out.append(rec)
        return out


def body_of(state: str) -> dict[str, Any]:
    body = json.loads(state.split(" ", 1)[1])
    if not isinstance(body, dict):
        raise ValueError("state body is not an object")
    return body


def encode(body: dict[str, Any]) -> str:
    return MAGIC + json.dumps(body, sort_keys=True, separators=(",", ":"))


def disk_rid(path: str) -> str:
    """What anyone can compute from a disk path (docs/DESIGN.md's key layout)."""
    return hashlib.sha256(b"disk\0" + os.path.realpath(path).encode()).hexdigest()


@dataclass
class Attempt:
    kind: str
    variant: str
    state: str
    uuid: str
    name: str
    disks: list[str]
    shared: set[str] = field(default_factory=set)
    """Disks to add with ResourceFlags.SHARED (so the resources match the state)."""
    migrate: bool = False
    origin: dict[str, Any] = field(default_factory=dict)


class Misuser:
    def __init__(self, host: Host, holding: Callable[..., Holding], gossip: Gossip) -> None:
        self.host = host
        self.holding = holding
        self.gossip = gossip
        self.rng = random.Random(host.cfg["seed"] ^ 0x5EED)
        self.pool: collections.deque[dict[str, Any]] = collections.deque(maxlen=80)
        self.hosts_seen: set[str] = set()
        self.tokens_seen: dict[str, list[int]] = collections.defaultdict(list)
        self.me = host.host_id

    # -- what a state looks like --------------------------------------------------

    def learn(self, recs: list[dict[str, Any]]) -> None:
        for rec in recs:
            self.pool.append(rec)
            self.hosts_seen.add(str(rec["host"]))
            if rec.get("dest"):
                self.hosts_seen.add(str(rec["dest"]))
            for r in rec["body"].get("res", []):
                toks = self.tokens_seen[str(r.get("res"))]
                toks.append(int(r.get("token", 0)))
                del toks[:-20]

    def live_uuids(self) -> set[str]:
        """Domains that exist on this host now: libvirt would not start a
        second one with the same uuid, so the misuser does not either."""
        plugin = self.host.plugin
        return {o.uuid for o in plugin.objects} if plugin is not None else set()

    def other_host(self, *not_these: str) -> str:
        cands = sorted(self.hosts_seen - {self.me, *not_these})
        return self.rng.choice(cands) if cands else "host-nobody"

    def fresh_uuid(self) -> str:
        return str(uuidlib.UUID(int=self.rng.getrandbits(128), version=4))

    def attempt(self, kind: str, variant: str, rec: dict[str, Any], body: dict[str, Any], *,
                uuid: str | None = None, migrate: bool = False) -> Attempt | None:
        disks = [str(d) for d in rec["disks"]]
        u = uuid or str(body.get("uuid"))
        if u in self.live_uuids():
            return None
        by_path = {os.path.realpath(d): d for d in disks}
        shared = {by_path.get(str(r.get("res")), "") for r in body.get("res", []) if r.get("mode") == "shared"}
        return Attempt(kind, variant, encode(body), u, f"{self.me}-mis-{u[:6]}", disks, shared - {""}, migrate,
                       {"host": rec["host"], "uuid": rec["uuid"], "src": rec["src"], "t": rec["t"]})

    # -- planning -----------------------------------------------------------------------

    def recent(self, pred: Callable[[dict[str, Any]], bool], n: int = 12) -> dict[str, Any] | None:
        cands = [r for r in list(self.pool)[-40:] if pred(r)][-n:]
        return self.rng.choice(cands) if cands else None

    def plan_replay(self) -> Attempt | None:
        rec = self.recent(lambda r: r["body"].get("kind") == "resume")
        if rec is None:
            return None
        body = dict(rec["body"])
        if self.rng.random() < 0.7:
            a = self.attempt("replay", "same_uuid", rec, body)
            if a is not None:
                return a
        return self.attempt("replay", "other_uuid", rec, body, uuid=self.fresh_uuid())

    def plan_edited(self, rec: dict[str, Any] | None = None, variant: str | None = None) -> Attempt | None:
        rec = rec or self.recent(lambda r: True)
        if rec is None:
            return None
        body = json.loads(json.dumps(rec["body"]))
        res = body.get("res", [])
        handoff = body.get("kind") == "handoff"
        variants = ["host", "uuid", "old_token", "mode", "kind"] + (["to", "to"] if handoff else [])
        variant = variant or self.rng.choice(variants)
        uuid: str | None = None
        migrate = handoff
        if variant == "host":
            body["host"] = self.me if rec["host"] != self.me else self.other_host()
        elif variant == "uuid":
            uuid = body["uuid"] = self.fresh_uuid()
        elif variant == "old_token":
            for r in res:
                older = [t for t in self.tokens_seen.get(str(r.get("res")), []) if t < int(r["token"])]
                r["token"] = self.rng.choice(older) if older else max(1, int(r["token"]) - self.rng.randint(1, 30))
        elif variant == "mode":
            for r in res:
                if r.get("mode") == "shared":
                    r["mode"] = "exclusive"
                    r.pop("xgen", None)
                else:
                    # the exclusive holder's token is the last exclusive grant
                    r["mode"], r["xgen"] = "shared", int(r["token"])
        elif variant == "to":
            body["to"] = self.me if rec.get("dest") != self.me else self.other_host(str(rec["host"]))
        elif handoff:  # kind handoff -> resume
            body["kind"] = "resume"
            body.pop("to", None)
            body.pop("marker", None)
            migrate = False
        else:  # kind resume -> handoff, to us, with a marker from a real handoff if we saw one
            body["kind"], body["to"] = "handoff", self.me
            other = self.recent(lambda r: r["body"].get("kind") == "handoff")
            body["marker"] = other["body"]["marker"] if other else secrets.token_hex(16)
            migrate = True
        return self.attempt("edited", f"{variant}{'' if variant != 'kind' else '_to_' + body['kind']}", rec,
                            body, uuid=uuid, migrate=migrate)

    def plan_cross(self, rec: dict[str, Any] | None = None) -> Attempt | None:
        rec = rec or self.recent(lambda r: r["body"].get("kind") == "handoff")
        if rec is None:
            return None
        body = dict(rec["body"])
        if rec.get("dest") == self.me:
            return self.attempt("cross", "dest_other_uuid", rec, body, uuid=self.fresh_uuid(), migrate=True)
        variant = "source_host" if rec["host"] == self.me else "third_host"
        return self.attempt("cross", variant, rec, body, migrate=True)

    # -- one attempt ------------------------------------------------------------------------

    def new_holding(self, plugin: v.Plugin, uuid: str, name: str, disks: list[str], shared: set[str],
                    migrate: bool) -> Holding | None:
        vm = self.host.spawn_vm()
        try:
            obj = plugin.new_object(uuid=uuid, name=name, pid=vm.pid,
                                    flags=v.NewFlags.MIGRATE if migrate else v.NewFlags(0))
            for d in disks:
                obj.add_resource(v.ResourceType.DISK, d,
                                 flags=v.ResourceFlags.SHARED if d in shared else v.ResourceFlags(0))
        except v.VirtleaseError:
            vm.kill()
            vm.wait()
            return None
        return self.holding(obj, uuid, name, disks, vm, self.host)

    def forge(self, plugin: v.Plugin) -> Attempt | None:
        """Probe a few disks; forge a state from the ResourceBusyError."""
        template = self.recent(lambda r: True, n=40)
        if template is None:
            return None
        disks = sorted(self.rng.sample(self.host.disks, self.rng.randint(1, 2)))
        uuid = self.fresh_uuid()
        h = self.new_holding(plugin, uuid, f"{self.me}-probe-{uuid[:6]}", disks, set(), False)
        if h is None:
            return None
        try:
            h.obj.acquire(action=v.FailureAction.POWEROFF)
        except v.ResourceBusyError as exc:
            conflicts = exc.conflicts
            self.host.drop(h)
        except v.VirtleaseError:
            self.host.drop(h)
            return None
        else:  # nobody held them: a real grant, treated as one
            self.use_grant(h, "misuse_probe")
            return None
        by_res: dict[str, v.Holder] = {}
        for c in conflicts:
            by_res.setdefault(c.resource, c)
        if not by_res:
            return None
        paths = {os.path.realpath(d): d for d in self.host.disks}
        cs = [by_res[r] for r in sorted(by_res) if r in paths]
        if not cs:
            return None
        first = cs[0]
        variants = ["as_holder", "own_host", "own_uuid"] + (["handoff_guess"] if first.handoff_to else [])
        variant = self.rng.choice(variants)
        fuuid = self.fresh_uuid() if variant == "own_uuid" else first.domain_uuid
        body: dict[str, Any] = {
            "kind": "resume", "cluster": template["body"].get("cluster"), "prefix": template["body"].get("prefix"),
            "host": first.host if variant in ("as_holder", "handoff_guess") else self.me,
            "uuid": fuuid, "name": first.domain_name, "rev": max(c.token for c in cs),
            "res": [{"kind": "disk", "res": c.resource, "rid": disk_rid(c.resource), "mode": c.mode,
                     "token": c.token, **({"xgen": c.token} if c.mode == "shared" else {})} for c in cs],
        }
        if variant == "handoff_guess":
            body |= {"kind": "handoff", "to": self.me, "marker": secrets.token_hex(16)}
        rec = {"host": first.host, "uuid": first.domain_uuid, "src": "busy", "t": mono(),
               "disks": [paths[c.resource] for c in cs], "body": body}
        return self.attempt("forged", variant, rec, body, uuid=fuuid, migrate=variant == "handoff_guess")

    def run_attempt(self, plugin: v.Plugin, a: Attempt) -> None:
        h = self.new_holding(plugin, a.uuid, a.name, a.disks, a.shared, a.migrate)
        if h is None:
            return
        common = {"kind": a.kind, "variant": a.variant, "obj": a.uuid, "disks": a.disks, "origin": a.origin}
        t_call = mono()
        try:
            h.obj.acquire(a.state, action=v.FailureAction.POWEROFF)
        except v.VirtleaseError as exc:
            self.host.ev("misuse", outcome="refused", error=type(exc).__name__, message=str(exc)[:200],
                         t_call=t_call, **common)
            self.host.drop(h)
            return
        except Exception as exc:
            self.host.ev("unexpected_error", obj=a.uuid, error=type(exc).__name__, message=str(exc)[:300],
                         where=f"misuse {a.kind}")
            self.host.ev("misuse", outcome="refused", error=type(exc).__name__, message=str(exc)[:200],
                         t_call=t_call, **common)
            self.host.drop(h)
            return
        self.use_grant(h, f"misuse:{a.kind}/{a.variant}", announce={"t_call": t_call, **common})

    def use_grant(self, h: Holding, via: str, announce: dict[str, Any] | None = None) -> str | None:
        """A grant, however obtained: write with its tokens, then release
        and free.  Returns the interval id (None if the grant was unusable)."""
        host = self.host
        try:
            h.obj.inquire()  # LeaseLostError if the session was lost meanwhile
            h.tokens = {r.name: r.token for r in h.obj.held()}
        except v.VirtleaseError as exc:
            host.ev("grant_after_loss", obj=h.uuid, via=via, message=str(exc)[:200])
            if announce is not None:
                host.ev("misuse", outcome="succeeded_lost", error=type(exc).__name__, **announce)
            if isinstance(exc, v.LeaseLostError) and not h.dead.wait(1.0):
                host.ev("violation", kind="vm_survived_loss", obj=h.uuid, pid=h.vm.pid,
                        detail=f"{via} returned success but the session was lost and the VM still runs")
            host.drop(h)
            return None
        host.open_interval(h, via)
        iid = h.iid
        if announce is not None:
            host.ev("misuse", outcome="succeeded", iid=iid, tokens=h.tokens, **announce)
        if h.obj.spec.flags & v.NewFlags.MIGRATE:
            try:
                h.obj.complete_migrate_in(cancel=False)
            except v.VirtleaseError as exc:
                host.ev("complete_in_failed", obj=h.uuid, error=type(exc).__name__, message=str(exc)[:200])
        result = host.write_all(h)
        if result == "ok":
            result = host.hold(h, self.rng.uniform(0.1, 0.4))
        host.close_interval(h, "release" if result == "done" else result)
        host.drop(h)
        return iid

    # -- the thread ---------------------------------------------------------------------------

    def loop(self) -> None:
        host = self.host
        while not host.stopping.is_set():
            plugin = host.current()
            if plugin is None:
                return
            fresh = self.gossip.poll()
            self.learn(fresh)
            handoffs = [r for r in fresh if r["body"].get("kind") == "handoff"]
            try:
                if handoffs:  # a migration is in flight: misuse its state now
                    rec = self.rng.choice(handoffs)
                    roll = self.rng.random()
                    a = (self.plan_cross(rec) if roll < 0.45
                         # a third host rewriting the destination to itself
                         else self.plan_edited(rec, "to") if roll < 0.8 and rec.get("dest") != self.me
                         else self.plan_edited(rec))
                else:
                    kind = self.rng.choice(KINDS)
                    a = (self.plan_replay() if kind == "replay" else self.plan_edited() if kind == "edited"
                         else self.forge(plugin) if kind == "forged" else self.plan_cross())
                if a is not None:
                    self.run_attempt(plugin, a)
            except Exception as exc:  # the misuser must never take its host down
                host.ev("unexpected_error", obj="", error=type(exc).__name__, message=str(exc)[:300],
                        where="misuser")
            time.sleep(self.rng.uniform(0.03, 0.12))
