"""Ray job entrypoint: `ray job submit --working-dir . -- python jobs/eval.py --config CONFIG [--set k=v ...]`."""

import sys

from _entry import main

sys.exit(main("eval"))
