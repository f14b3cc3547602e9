"""A pool of ready guests (`sandbox pool`): restored, confined, mounted and exercised before a run asks for one."""
