#!/usr/bin/env python3
"""What the served model's BPE word cache costs in memory and what turning it off costs in time.

tokenizers 0.23 keeps the BPE word cache per thread (up to 10,000 words each). This encodes every
paragraph of a SQuAD-format file with the model's `tokenizer.json` (the same Rust code domainrag
links, through Python's `tokenizers`), reading the live heap (glibc `mallinfo2`: bytes in use)
as it goes, then encodes 800 paragraphs on a second thread and reads the heap while that thread
is alive;
once with the cache as the file configures it and once with it off (capacity 0, what
`engine::chat` sets). Each setting runs in a fresh process.

usage: tokenizer_cache.py --tokenizer data/models/SmolLM2-135M-Instruct-hf/tokenizer.json \
    --paragraphs data/squad/new_wiki_v1.0.json [--out bench/soak/tokenizer-cache.json]
(needs `tokenizers`, e.g. ~/.cache/domainrag/venv/bin/python from scripts/fetch-models.sh)
"""

import argparse
import ctypes
import json
import threading
import time

import isolated


class MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in
                "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()]


LIBC = ctypes.CDLL("libc.so.6")
LIBC.mallinfo2.restype = MallInfo2


def heap_mib():
    m = LIBC.mallinfo2()
    return (m.uordblks + m.hblkhd) / 2**20


def measure(tokenizer_path, paragraphs_path, cache):
    """One setting, in this process: heap growth on one thread, then with a second thread."""
    from tokenizers import Tokenizer
    with open(paragraphs_path) as f:
        ctx = [p["context"] for a in json.load(f)["data"] for p in a["paragraphs"]]
    tok = Tokenizer.from_file(tokenizer_path)
    if not cache:
        tok.model._resize_cache(0)
    tok.encode("warm up")
    base = heap_mib()
    growth = []
    t = time.perf_counter()
    for i, c in enumerate(ctx):
        tok.encode(c)
        if i % 200 == 0:
            growth.append([i, round(heap_mib() - base, 3)])
    seconds = time.perf_counter() - t
    one_thread = heap_mib() - base
    seen = {}

    def second():
        for c in ctx[:800]:
            tok.encode(c)
        seen["alive"] = heap_mib() - base

    th = threading.Thread(target=second)
    th.start()
    th.join()
    return {
        "cache": cache,
        "paragraphs": len(ctx),
        "words_per_paragraph": round(sum(len(c.split()) for c in ctx) / len(ctx), 1),
        "ms_per_paragraph": round(1000 * seconds / len(ctx), 4),
        "heap_growth_mib_one_thread": round(one_thread, 3),
        "heap_growth_mib_with_second_thread_alive": round(seen["alive"], 3),
        "heap_growth_mib_by_paragraph": growth,
    }


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokenizer", required=True)
    p.add_argument("--paragraphs", required=True)
    p.add_argument("--out")
    p.add_argument("--one", choices=["on", "off"], help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.one:
        print(json.dumps(measure(a.tokenizer, a.paragraphs, a.one == "on")))
        return
    runs = isolated.run_each(__file__, ["--tokenizer", a.tokenizer, "--paragraphs", a.paragraphs],
                             ["on", "off"])
    isolated.print_table(
        ["word cache", "heap growth, one thread (MiB)", "with a second thread alive", "ms per paragraph"],
        [["on" if r["cache"] else "off", r["heap_growth_mib_one_thread"],
          r["heap_growth_mib_with_second_thread_alive"], r["ms_per_paragraph"]] for r in runs])
    if a.out:
        with open(a.out, "w") as f:
            json.dump({"runs": runs}, f, indent=1)


if __name__ == "__main__":
    main()
