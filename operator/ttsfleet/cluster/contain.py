"""Run a command with a pod's volumes at their container paths (the local runner).

    python -m ttsfleet.cluster.contain --bind SOURCE=TARGET ... -- COMMAND ...

Meant to run under `ip netns exec`, which gives the command a mount namespace of its
own (mounts made here do not reach the host): each SOURCE (a directory or file the
runner wrote) is bind-mounted at TARGET, as a container runtime mounts volumes, and
then COMMAND replaces this process. A missing TARGET is created first (an empty
directory or file on the host: the mount point).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path


def main(argv: list[str]) -> int:
    if "--" not in argv:
        print("usage: contain --bind SOURCE=TARGET ... -- COMMAND ...", file=sys.stderr)
        return 2
    split = argv.index("--")
    options, command = argv[:split], argv[split + 1 :]
    binds = [options[i + 1] for i, arg in enumerate(options) if arg == "--bind"]
    for bind in binds:
        source, _, target = bind.partition("=")
        where = Path(target)
        if Path(source).is_dir():
            where.mkdir(parents=True, exist_ok=True)
        elif not where.exists():
            where.parent.mkdir(parents=True, exist_ok=True)
            where.touch()
        subprocess.run(["mount", "--bind", source, target], check=True)
    os.execvp(command[0], command)  # noqa: S606 - the pod's own command
    return 1  # not reached


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
