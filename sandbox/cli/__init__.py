"""The `sandbox` command line: its parser, verbs, options, defaults, man page and completion (main.py is the entry point)."""
