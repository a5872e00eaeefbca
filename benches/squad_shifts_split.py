"""Split SQuAD-Shifts new_wiki by article for the adapter-training benchmark (standard library).

Articles are shuffled with a fixed seed; the first half is the training side, the rest is
held out. Writes SQuAD-format files that keep every paragraph of their articles (so paragraph
numbers, and with them domainrag's document ids `squad:<title>:<n>`, match the ingested corpus)
but only the sampled questions:
  train.json            --train questions sampled from the training articles (the peer's data)
  train-served.json     the first --served of them (a superset of train.json when --served is
                        larger): the questions the served adapter's retrieved triplets come from
  heldout.json          --heldout questions sampled from the held-out articles
  heldout-peer.json     the first --peer of those (the peer's evaluation set)
"""

import argparse
import json
import lzma
import random
from pathlib import Path


def load(path: Path) -> dict:
    opener = lzma.open if path.suffix == ".xz" else open
    with opener(path, "rt", encoding="utf-8") as f:
        return json.load(f)


def keep_only(articles: list, ids: set) -> dict:
    out = []
    for a in articles:
        paragraphs = [
            {"context": p["context"], "qas": [q for q in p["qas"] if q["id"] in ids]}
            for p in a["paragraphs"]
        ]
        if any(p["qas"] for p in paragraphs):
            out.append({"title": a["title"], "paragraphs": paragraphs})
    return {"version": "domainrag-split", "data": out}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--input", required=True)
    ap.add_argument("--out-dir", required=True)
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--train", type=int, default=300)
    ap.add_argument("--heldout", type=int, default=200)
    ap.add_argument("--peer", type=int, default=100)
    ap.add_argument("--served", type=int, default=300)
    args = ap.parse_args()
    data = load(Path(args.input))["data"]
    rng = random.Random(args.seed)
    articles = sorted(data, key=lambda a: a["title"])
    rng.shuffle(articles)
    half = len(articles) // 2
    train_articles, heldout_articles = articles[:half], articles[half:]

    def questions(arts):
        return [q["id"] for a in arts for p in a["paragraphs"] for q in p["qas"]]

    train_ids = questions(train_articles)
    heldout_ids = questions(heldout_articles)
    rng.shuffle(train_ids)
    rng.shuffle(heldout_ids)
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files = {
        "train.json": (train_articles, train_ids[: args.train]),
        "train-served.json": (train_articles, train_ids[: args.served]),
        "heldout.json": (heldout_articles, heldout_ids[: args.heldout]),
        "heldout-peer.json": (heldout_articles, heldout_ids[: args.peer]),
    }
    for name, (arts, ids) in files.items():
        with open(out / name, "w", encoding="utf-8") as f:
            json.dump(keep_only(arts, set(ids)), f)
    summary = {
        "train_articles": [a["title"] for a in train_articles],
        "heldout_articles": [a["title"] for a in heldout_articles],
        "train_questions": min(args.train, len(train_ids)),
        "served_questions": min(args.served, len(train_ids)),
        "heldout_questions": min(args.heldout, len(heldout_ids)),
        "peer_questions": min(args.peer, len(heldout_ids)),
        "seed": args.seed,
    }
    with open(out / "split.json", "w", encoding="utf-8") as f:
        json.dump(summary, f, indent=1)
    print(json.dumps({k: v for k, v in summary.items() if not k.endswith("articles")}))


if __name__ == "__main__":
    main()
