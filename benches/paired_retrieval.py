#!/usr/bin/env python3
"""Paired comparison of two `domainrag eval retrieval --per-question FILE` runs on the same
questions (two settings, or two builds): per mode and metric, the mean of B - A over the questions
both scored, with a percentile-bootstrap 95% interval (2,000 resamples of the questions, fixed
seed), in points (x100).

usage: paired_retrieval.py A.jsonl B.jsonl [--metrics recall@5,ndcg@10] [--out FILE.json]
"""

import argparse
import json
import random


def load(path):
    out = {}
    for line in open(path):
        row = json.loads(line)
        out[(row["mode"], row["id"])] = row
    return out


def interval(diffs, resamples=2_000, seed=7):
    rng = random.Random(seed)
    n = len(diffs)
    means = sorted(sum(rng.choices(diffs, k=n)) / n for _ in range(resamples))
    return means[int(0.025 * (resamples - 1))], means[int(0.975 * (resamples - 1))]


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("a")
    p.add_argument("b")
    p.add_argument("--metrics", default="recall@5,ndcg@10")
    p.add_argument("--out")
    args = p.parse_args()
    a, b = load(args.a), load(args.b)
    modes = sorted({mode for mode, _ in a} & {mode for mode, _ in b})
    result = []
    print("| mode | metric | questions | A | B | B - A (points) | 95% interval |")
    print("|---|---|---|---|---|---|---|")
    for mode in modes:
        keys = [k for k in a if k[0] == mode and k in b]
        for metric in args.metrics.split(","):
            diffs = [b[k][metric] - a[k][metric] for k in keys]
            mean_a = sum(a[k][metric] for k in keys) / len(keys)
            mean_b = sum(b[k][metric] for k in keys) / len(keys)
            lo, hi = interval(diffs)
            row = {"mode": mode, "metric": metric, "questions": len(keys), "a": mean_a, "b": mean_b,
                   "difference": mean_b - mean_a, "low": lo, "high": hi}
            result.append(row)
            print(f"| {mode} | {metric} | {len(keys)} | {mean_a:.4f} | {mean_b:.4f} | "
                  f"{100 * (mean_b - mean_a):+.2f} | {100 * lo:+.2f} .. {100 * hi:+.2f} |")
    if args.out:
        json.dump(result, open(args.out, "w"), indent=2)


if __name__ == "__main__":
    main()
