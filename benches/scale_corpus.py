"""Distractor documents for retrieval at scale: N JSONL documents of 4-8 sentences each (~80-200
words, one chunk at the default 160 words or two), drawn with a fixed seed from the sentences of
SQuAD-Shifts new_wiki and Amazon reviews. Ingested beside SQuAD dev, they make a collection of
>= 100k chunks whose SQuAD dev questions still have one known gold paragraph (no distractor
sentence comes from SQuAD dev), so recall can be measured at that size.

  python3 benches/scale_corpus.py --out ~/.cache/domainrag/bench-scale/distractors.jsonl --docs 98000
"""

import argparse
import json
import os
import random
import re


def sentences(path):
    with open(path) as f:
        data = json.load(f)["data"]
    out = []
    for article in data:
        for p in article["paragraphs"]:
            for s in re.split(r"(?<=[.!?])\s+", p["context"]):
                if 6 <= len(s.split()) <= 60:
                    out.append(s.strip())
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--docs", type=int, required=True)
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument(
        "--sources",
        nargs="+",
        default=["data/squad/new_wiki_v1.0.json", "data/squad/amazon_reviews_v1.0.json"],
    )
    args = ap.parse_args()
    pool = [s for path in args.sources for s in sentences(path)]
    rng = random.Random(args.seed)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    words = 0
    with open(args.out, "w") as f:
        for i in range(args.docs):
            text = " ".join(rng.choice(pool) for _ in range(rng.randint(4, 8)))
            words += len(text.split())
            title = f"Distractor {i // 50}"
            f.write(json.dumps({"id": f"distractor-{i}", "title": title, "text": text}) + "\n")
    print(f"{args.docs} documents, {words / args.docs:.0f} words on average, from {len(pool)} sentences -> {args.out}")


if __name__ == "__main__":
    main()
