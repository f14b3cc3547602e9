import sys

from sandbox.cli.launch import main

sys.exit(main())
