"""What runs the guest: the Backend interface (base.py), QEMU run here (direct/), libvirtd here or elsewhere (libvirt/)."""
