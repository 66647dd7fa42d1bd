"""virtlease's lab: the rigs and support that tests, benchmarks and demos share (not shipped).

``libvirt/`` is the two-host libvirt rig (namespaces, stock libvirtd, the agent on each host).
"""
