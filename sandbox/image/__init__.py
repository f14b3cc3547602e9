"""The guest image: the host's kernel, its modules, the initramfs and the guest init built for it, and the host's facts (accelerator, QEMU)."""
