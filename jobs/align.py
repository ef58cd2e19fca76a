"""Ray job entrypoint: `ray job submit --working-dir . -- python jobs/align.py --config CONFIG [--set k=v ...]`."""

import sys

from proxykd.cli import main

if __name__ == "__main__":
    args = sys.argv[1:]
    if args[:1] == ["--config"]:
        args = args[1:]
    sys.exit(main(["align", *args]))
