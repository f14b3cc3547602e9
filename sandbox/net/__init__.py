"""The sandbox's network (--net): none, user (passt), nat (a virtual network), bridge (the LAN)."""
