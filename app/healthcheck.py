"""Container healthchecks, so the images need no curl: `python3 healthcheck.py web|worker`."""

import os
import sys
import time
import urllib.request

what = sys.argv[1] if len(sys.argv) > 1 else "web"
if what == "web":
    port = os.environ.get("PORT", "8000")
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=3) as resp:
        sys.exit(0 if resp.status == 200 else 1)
elif what == "worker":
    path = os.environ.get("HEARTBEAT_FILE", "/tmp/worker-heartbeat")
    max_age = 3 * float(os.environ.get("WORKER_INTERVAL", "5")) + 5
    try:
        sys.exit(0 if time.time() - os.stat(path).st_mtime < max_age else 1)
    except FileNotFoundError:
        sys.exit(1)
sys.exit(2)
