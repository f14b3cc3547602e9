"""What sandboxes do beside running one command: X11, `exec`, keys, and named sandboxes (registry, lifecycle, attach)."""
