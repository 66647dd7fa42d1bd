"""``virtlease agent``: a stand-in for libvirt's virtlockd that keeps leases in etcd.

libvirtd's stock ``lockd`` lock plugin talks to virtlockd over a root-only UNIX socket
with a small XDR RPC program (0x0EA7BEEF).  This package speaks that protocol:

* ``protocol``: framing and encoding of every procedure and the error reply, pure functions
  (``messages``: constants, enums, message types; ``xdr``: the XDR primitives).
* ``server``: an asyncio UNIX-socket server with per-connection state and call-order rules
  as virtlockd enforces them, dispatching to a :class:`~.lockapi.LockBackend` (``lockapi``: the
  backend's contract; ``sockets``: the listening socket's safety checks).
* ``lockdclient``: a small blocking client for tests and benchmarks.

The etcd side: ``backend`` (lockd calls on the etcd driver) with its ``tracking.ProcessWatcher``
(the owners' QEMU processes, watched by pidfd), ``restart`` + ``runfile`` + ``session.guard``
(crash/restart safety: a restarted agent continues the lease; a guard process stops the owners
if none does), ``metrics`` (Prometheus),
``main`` (the agent's run) under ``command`` (its command line: ``virtlease agent``,
``virtlease-agent``, ``python -m virtlease_etcd.agent``).
"""
