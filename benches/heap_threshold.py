#!/usr/bin/env python3
"""What pinning glibc's mmap threshold (`generate.heap_mmap_threshold_kib`) costs in answer time.

Runs `BIN eval answers` on the same sample of questions (base model only) once per setting per
round, alternating the settings so that a change in the machine's load hits both, and reports per
setting the median over rounds of seconds per answer, median time to first token, peak RSS and
RSS after the last answer, plus the ratio to the first setting:

  heap_threshold.py --bin BIN --data-dir data --collection newwiki \
      --questions data/squad/new_wiki_v1.0.json --sample 15 --rounds 2 \
      --settings 0,256 --out bench/soak/heap-threshold.json

Standard library only.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile


def run_once(args, kib, path):
    env = dict(os.environ)
    env["DOMAINRAG__GENERATE__HEAP_MMAP_THRESHOLD_KIB"] = str(kib)
    env["DOMAINRAG__GENERATE__MAX_TOKENS"] = str(args.max_tokens)
    cmd = [
        args.bin, "--data-dir", args.data_dir, "eval", "answers",
        "--collection", args.collection, "--format", "squad", "--questions", args.questions,
        "--sample", str(args.sample), "--seed", str(args.seed), "--adapter", "none",
        "--json", path,
    ]
    subprocess.run(cmd, env=env, check=True, stdout=subprocess.DEVNULL)
    with open(path) as f:
        report = json.load(f)
    arm = report["arms"]["none"]
    memory = report["memory"]
    return {
        "seconds_per_answer": arm["seconds_per_answer"],
        "first_token_ms_median": arm["median_first_token_ms"],
        "f1": arm["f1"],
        "peak_rss_mib": memory["peak_rss_mib"],
        "last_rss_mib": memory["rss_mib_after_answer"][-1],
    }


def summarise(runs, base):
    keys = ["seconds_per_answer", "first_token_ms_median", "peak_rss_mib", "last_rss_mib"]
    out = {k: statistics.median(r[k] for r in runs) for k in keys}
    if base is not None:
        out["seconds_per_answer_ratio"] = out["seconds_per_answer"] / base["seconds_per_answer"]
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--bin", required=True)
    p.add_argument("--data-dir", default="data")
    p.add_argument("--collection", required=True)
    p.add_argument("--questions", required=True)
    p.add_argument("--sample", type=int, default=15)
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--settings", default="0,256", help="thresholds in KiB, the first is the reference")
    p.add_argument("--out", required=True)
    args = p.parse_args()
    settings = [int(s) for s in args.settings.split(",")]
    runs = {k: [] for k in settings}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            for kib in settings:
                result = run_once(args, kib, os.path.join(tmp, f"{kib}-{r}.json"))
                runs[kib].append(result)
                print(f"round {r + 1} threshold {kib} KiB: {result}", file=sys.stderr)
    base = summarise(runs[settings[0]], None)
    summary = {str(k): summarise(runs[k], base) for k in settings}
    out = {
        "engine": os.environ.get("DOMAINRAG__GENERATE__ENGINE", "(configured)"),
        "collection": args.collection,
        "questions": args.questions,
        "sample": args.sample,
        "seed": args.seed,
        "max_tokens": args.max_tokens,
        "rounds": args.rounds,
        "runs": {str(k): v for k, v in runs.items()},
        "summary": summary,
    }
    with open(args.out, "w") as f:
        json.dump(out, f, indent=1)
    print("| threshold KiB | s per answer (x ref) | TTFT median ms | peak RSS MiB | RSS after last MiB |")
    print("|---|---|---|---|---|")
    for k in settings:
        s = summary[str(k)]
        print(f"| {k} | {s['seconds_per_answer']:.2f} ({s['seconds_per_answer_ratio']:.2f}x) | "
              f"{s['first_token_ms_median']:.0f} | {s['peak_rss_mib']:.0f} | {s['last_rss_mib']:.0f} |")


if __name__ == "__main__":
    main()
