"""What every layer uses: the one exception hierarchy, child processes, runtime and cache dirs, sizes, the progress line."""
