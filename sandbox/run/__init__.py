"""One `sandbox run`: the request, the mount plan, the runner and its relay, timings and diagnostics."""
