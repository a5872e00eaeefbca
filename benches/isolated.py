"""Helpers of the memory benchmarks that compare settings: each setting in a fresh process of its
own (memory a setting leaves behind, allocator state, caches, arenas, cannot colour the next
one's figures), and their results as a markdown table."""

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


def print_table(headers, rows):
    """A markdown table of `rows` (lists of cells) under `headers`."""
    print("| " + " | ".join(headers) + " |")
    print("|" + "---|" * len(headers))
    for row in rows:
        print("| " + " | ".join(str(c) for c in row) + " |")
