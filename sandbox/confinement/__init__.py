"""libvirt's walls around each QEMU: sVirt labels (MCS pairs, libselinux), DAC and idmapped views, cgroups, audit."""
