"""Run one command in a throw-away KVM/TCG virtual machine over the host's read-only root."""

__version__ = "0.1.0"
