"""Two libvirt hosts on one machine, driven by stock ``virsh`` (README: "With libvirt")."""
