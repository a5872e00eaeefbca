"""SQuAD-format data with long documents, for tuning retrieval on documents that span several
chunks without tuning on the held-out set (standard library).

Each article's consecutive paragraphs are joined (blank line between) into documents of at least
--min-words words (the last one of an article may be shorter); every question moves with its
paragraph, its answer offsets shifted. On SQuAD dev and new_wiki (paragraphs of ~120 words, one
chunk each) this gives documents of several chunks, as a team's manuals or long reviews are, so
that chunking and BM25's windows can be chosen on them and checked on SQuAD-Shifts Amazon.

  python3 benches/long_docs.py data/squad/squaddev_v1.1.json --out squad-long.json [--min-words 300]
"""

import argparse
import json


def merge(article: dict, min_words: int) -> dict:
    out, context, qas = [], "", []
    for p in article["paragraphs"]:
        shift = len(context) + (2 if context else 0)
        context = f"{context}\n\n{p['context']}" if context else p["context"]
        for qa in p["qas"]:
            qa = dict(qa)
            qa["answers"] = [{**a, "answer_start": a["answer_start"] + shift} for a in qa.get("answers", [])]
            qas.append(qa)
        if len(context.split()) >= min_words:
            out.append({"context": context, "qas": qas})
            context, qas = "", []
    if context:
        out.append({"context": context, "qas": qas})
    return {"title": article["title"], "paragraphs": out}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("squad")
    ap.add_argument("--out", required=True)
    ap.add_argument("--min-words", type=int, default=300)
    args = ap.parse_args()
    with open(args.squad, encoding="utf-8") as f:
        data = json.load(f)
    data["data"] = [merge(a, args.min_words) for a in data["data"]]
    with open(args.out, "w", encoding="utf-8") as f:
        json.dump(data, f)
    docs = [p for a in data["data"] for p in a["paragraphs"]]
    words = sorted(len(p["context"].split()) for p in docs)
    print(f"{len(docs)} documents, words p50 {words[len(words) // 2]}, p90 {words[len(words) * 9 // 10]}, "
          f"{sum(len(p['qas']) for p in docs)} questions")


if __name__ == "__main__":
    main()
