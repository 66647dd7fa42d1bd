"""virtlease's lab: the rigs and support that tests, benchmarks and demos share (not shipped).

Tests, ``bench/`` and ``make demo LIBVIRT=1`` import these modules by their full name; test
modules import nothing from one another (pytest runs with ``--import-mode=importlib``).

* ``libvirt/``: the two-host libvirt rig (namespaces, stock libvirtd, the agent on each host);
* ``nemesis/``: the fault-injection harness of tests/safety (hosts, storage model, misuser, checker);
* ``relay``: the one byte relay to etcd that tests cut, blackhole, slow or count requests through;
* ``etcdserver``, ``etcdcontainer``: the etcd a test runs against; ``pki``, ``tlscluster``: a
  TLS etcd cluster with its certificates;
* ``drivers``: drivers per host, their teardown, the tests' TTLs; ``agentprocess``, ``agents``,
  ``standin``, ``lockdharness``, ``socketunit``: the agent as a process, in-process behind a
  relay, a stand-in QEMU, the lockd protocol harness, systemd's socket unit reproduced;
* ``cliproc``: the ``virtlease`` command as a subprocess; ``debroot``: the package built from a
  clean copy and clean Debian roots to install it in;
* ``storage``: loop devices, file systems, mounts, sshd/sshfs for the identity tests;
* ``waiting``, ``ports``, ``stats``: ``wait_for``, ``free_port``, ``percentile`` -- one of each.
"""
