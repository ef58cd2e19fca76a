"""Ray job entrypoint: `ray job submit --working-dir . -- python jobs/teacher.py --config CONFIG [--set k=v ...]`."""

import sys

from _entry import main

sys.exit(main("teacher"))
