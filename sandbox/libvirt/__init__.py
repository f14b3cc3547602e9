"""The libvirt backend (--connect URI): the same guest, spec, protocol and relay, run by libvirtd."""
