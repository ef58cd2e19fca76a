"""Shared by the job scripts: `python jobs/<stage>.py --config CONFIG [--set key=value ...]`.

They run through `proxykd.cli.main`, so a job takes the run folder's lock (proxykd/runlock.py) like
the CLI does: a second job on the same run_dir (a resubmission, a RayJob applied twice) exits 2 at
once, naming the run that holds it, and never touches the first run's files."""

import sys
from pathlib import Path

# The job's working directory holds the repo: import proxykd from it even where it is not installed.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(command: str) -> int:
    from proxykd.cli import main as cli
    from proxykd.jobs import load_secrets_file

    # The teacher key from the head's secrets file (VM clusters; on Kubernetes the head pod's
    # environment has it from a Secret): this driver runs on the head, its workers never see it.
    if loaded := load_secrets_file():
        print(f"proxykd: loaded {', '.join(loaded)} from the head's secrets file", file=sys.stderr, flush=True)

    args = sys.argv[1:]
    if args[:1] == ["--config"]:
        args = args[1:]
    return cli([command, *args])
