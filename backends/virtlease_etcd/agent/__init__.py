"""``virtlease agent``: a stand-in for libvirt's virtlockd that keeps leases in etcd.

libvirtd's stock ``lockd`` lock plugin talks to virtlockd over a root-only UNIX socket
with a small XDR RPC program (0x0EA7BEEF).  This package speaks that protocol:

* ``protocol``: framing and XDR of every procedure, the error reply; pure functions.
* ``server``: an asyncio UNIX-socket server with per-connection state and call-order rules
  as virtlockd enforces them, dispatching to a :class:`~.server.LockBackend`.
* ``client``: a small blocking client for tests and benchmarks.

No lock logic lives here; the etcd-backed ``LockBackend`` is separate.
"""
