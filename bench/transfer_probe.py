#!/usr/bin/env python3
"""One transfer through the tool's own code, as a whole process (for peak RSS):

transfer_probe.py pull HOSTS REMOTE LOCAL SIZE SHA256   the backup pull phase
transfer_probe.py push HOSTS LOCAL REMOTE               the restore upload
transfer_probe.py fabric-get|fabric-put HOSTS SRC DST   plain Fabric, for comparison
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from deployment import backup as bk
from deployment import inventory
from deployment.session import sessions


def main(argv):
    action, hosts = argv[0], argv[1]
    env = inventory.load(Path(hosts)).environment("b1")
    (hs,) = sessions(env)
    try:
        if action == "pull":
            remote, local, size, sha = argv[2], Path(argv[3]), int(argv[4]), argv[5]
            bk.pull(hs.runner, remote, size, sha, local, bk.Reporter(open("/dev/null", "w"), tty=False))
        elif action == "push":
            hs.runner.put_file(argv[2], argv[3])
        elif action == "fabric-get":
            hs.runner.conn.get(argv[2], argv[3])
        elif action == "fabric-put":
            hs.runner.conn.put(argv[2], argv[3])
        else:
            raise SystemExit(f"unknown action {action}")
    finally:
        hs.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
