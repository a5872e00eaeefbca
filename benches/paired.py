#!/usr/bin/env python3
"""Paired comparison of two `domainrag eval answers --json` reports (same questions, one arm each
or a named arm): per metric, the mean of B - A over the questions both answered, with a
percentile-bootstrap 95% interval (10,000 resamples, fixed seed). For settings that `eval
answers` cannot put side by side as arms (a generation setting, a prompt), run it twice and
compare here.

usage: paired.py A.json B.json [--arm-a none] [--arm-b none] [--out FILE.json]
"""

import argparse
import json
import random

METRICS = {
    "f1": lambda q: q["f1"],
    "em": lambda q: q["em"],
    "faithfulness": lambda q: 1.0 if q["faithfulness"] is None else q["faithfulness"],
    "answer_relevance": lambda q: q["answer_relevance"],
    "hallucinated": lambda q: float(q["hallucinated"]),
    "loops": lambda q: float(q["loops"]),
    "cut_off": lambda q: float(q["cut_off"]),
    "words": lambda q: float(q["words"]),
    "first_token_ms": lambda q: q["first_token_ms"],
}


def interval(diffs, resamples=10_000, seed=7):
    rng = random.Random(seed)
    n = len(diffs)
    means = sorted(sum(diffs[rng.randrange(n)] for _ in range(n)) / n for _ in range(resamples))
    return means[int(0.025 * (resamples - 1))], means[int(0.975 * (resamples - 1))]


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("a")
    p.add_argument("b")
    p.add_argument("--arm-a", default="none")
    p.add_argument("--arm-b", default="none")
    p.add_argument("--out")
    args = p.parse_args()
    a = {q["id"] or q["query"]: q for q in json.load(open(args.a))["per_question"][args.arm_a]}
    b = {q["id"] or q["query"]: q for q in json.load(open(args.b))["per_question"][args.arm_b]}
    ids = [i for i in a if i in b]
    if not ids:
        raise SystemExit("paired: the two reports share no question")
    out = {"a": args.a, "b": args.b, "questions": len(ids), "metrics": {}}
    print(f"{len(ids)} paired questions; B = {args.b}, A = {args.a}")
    print("| metric | A | B | B - A | 95% CI |\n|---|---|---|---|---|")
    for name, f in METRICS.items():
        xa = [f(a[i]) for i in ids]
        xb = [f(b[i]) for i in ids]
        diffs = [y - x for x, y in zip(xa, xb)]
        lo, hi = interval(diffs)
        ma, mb, md = sum(xa) / len(ids), sum(xb) / len(ids), sum(diffs) / len(ids)
        out["metrics"][name] = {"a": ma, "b": mb, "diff": md, "ci95": [lo, hi]}
        print(f"| {name} | {ma:.3f} | {mb:.3f} | {md:+.3f} | {lo:+.3f} .. {hi:+.3f} |")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
