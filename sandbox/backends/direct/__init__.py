"""The direct QEMU backend: the command line, the process, its monitor, and the boot images it is handed."""
