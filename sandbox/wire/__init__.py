"""How host and guest talk: the protocol (kept in step with guest-init/protocol.h), the multiplexed ports, socket helpers."""
