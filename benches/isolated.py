"""Each setting of a benchmark in a fresh process of its own: memory a setting leaves behind
(allocator state, caches, arenas) cannot colour the next one's figures."""

import json
import subprocess
import sys


def run_each(script, args, settings, flag="--one"):
    """Run `python script *args flag setting` for every setting; each prints one JSON object."""
    results = []
    for setting in settings:
        out = subprocess.run([sys.executable, script, *args, flag, setting],
                             check=True, capture_output=True, text=True).stdout
        results.append(json.loads(out))
    return results
