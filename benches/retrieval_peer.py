"""The retrieval peer: what a team would write in Python instead of running domainrag.

BM25 is bm25s (Lucene variant, k1 1.5, b 0.75) over each SQuAD paragraph's text, tokenised by
bm25s with its English stopword list and the Snowball English stemmer (PyStemmer); dense is the same
embedding model domainrag ships (all-MiniLM-L6-v2 ONNX, mean pooling, 256 tokens) through
onnxruntime, with exact cosine search in numpy; fusion is over 50 candidates per retriever, both the
weighted sum of min-max normalised scores (equal weights, domainrag's recipe) and reciprocal rank
fusion (k 60). Documents are paragraphs, named as domainrag names them (`squad:<title>:<n>`), and
the metrics are domainrag's (recall@1/5/10, MRR@10, nDCG@10 over documents).

Writes JSON (metrics per mode, and per-query search time without query embedding) and prints a
table; `--per-question FILE` also writes each question's metrics per mode as JSONL in the shape of
`domainrag eval retrieval --per-question` (the weighted fusion as mode `hybrid`, RRF as
`hybrid_rrf`), for `benches/paired_retrieval.py`. `--extra-jsonl FILE` adds the documents of a JSONL file (`benches/scale_corpus.py`'s
distractors) to time search at domainrag's scale collection's size: BM25 indexes their text, but
their vectors are random unit vectors instead of embeddings (embedding 86k documents in Python
would take longer than the whole benchmark; numpy's exact search costs the same for any values),
so quality at that size is measured on domainrag only.

  PY=$(bash benches/retrieval-peer-venv.sh)
  $PY benches/retrieval_peer.py --squad data/squad/amazon_reviews_v1.0.json \
      --model-dir data/models/all-MiniLM-L6-v2 --out bench/retrieval/peer-amazon.json
"""

import argparse
import json
import math
import os
import statistics
import sys
import time


def load_squad(path):
    with open(path) as f:
        data = json.load(f)["data"]
    docs, questions = [], []
    for article in data:
        title = article["title"]
        for n, p in enumerate(article["paragraphs"]):
            doc_id = f"squad:{title}:{n}"
            docs.append((doc_id, title, p["context"]))
            for qa in p["qas"]:
                questions.append((qa["question"], doc_id, qa["id"]))
    return docs, questions


class Embedder:
    def __init__(self, model_dir, threads):
        import onnxruntime as ort
        from tokenizers import Tokenizer

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        self.session = ort.InferenceSession(
            os.path.join(model_dir, "model.onnx"), opts, providers=["CPUExecutionProvider"]
        )
        self.tok = Tokenizer.from_file(os.path.join(model_dir, "tokenizer.json"))
        self.tok.enable_truncation(256)
        self.tok.enable_padding()
        self.inputs = {i.name for i in self.session.get_inputs()}

    def embed(self, texts, batch=64):
        import numpy as np

        out = []
        for i in range(0, len(texts), batch):
            enc = self.tok.encode_batch(texts[i : i + batch])
            ids = np.array([e.ids for e in enc], dtype=np.int64)
            mask = np.array([e.attention_mask for e in enc], dtype=np.int64)
            feed = {"input_ids": ids, "attention_mask": mask}
            if "token_type_ids" in self.inputs:
                feed["token_type_ids"] = np.zeros_like(ids)
            hidden = self.session.run(None, feed)[0]
            m = mask[:, :, None].astype(np.float32)
            pooled = (hidden * m).sum(1) / np.maximum(m.sum(1), 1e-9)
            pooled /= np.linalg.norm(pooled, axis=1, keepdims=True) + 1e-12
            out.append(pooled.astype(np.float32))
        return np.concatenate(out)


def minmax(scores):
    lo, hi = min(scores.values()), max(scores.values())
    return {k: (v - lo) / (hi - lo) if hi - lo > 1e-6 else 1.0 for k, v in scores.items()}


def fuse(bm25, dense, method):
    """bm25, dense: lists of (doc index, score), best first."""
    total = {}
    for ranked in (bm25, dense):
        if not ranked:
            continue
        if method == "rrf":
            for rank, (d, _) in enumerate(ranked):
                total[d] = total.get(d, 0.0) + 1.0 / (60 + rank + 1)
        else:
            for d, s in minmax(dict(ranked)).items():
                total[d] = total.get(d, 0.0) + s
    return sorted(total, key=lambda d: -total[d])


def score(ranked_ids, gold):
    first = next((r for r, d in enumerate(ranked_ids[:10]) if d == gold), None)
    rec = lambda k: 1.0 if first is not None and first < k else 0.0
    return {
        "recall@1": rec(1),
        "recall@5": rec(5),
        "recall@10": rec(10),
        "mrr@10": 0.0 if first is None else 1.0 / (first + 1),
        "ndcg@10": 0.0 if first is None else 1.0 / math.log2(first + 2),
    }


def percentile(xs, p):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))]


def load_jsonl(path):
    with open(path) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return [(str(r["id"]), r.get("title", ""), r["text"]) for r in rows]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--squad", required=True)
    ap.add_argument("--model-dir", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--limit", type=int, default=0, help="first N questions only")
    ap.add_argument("--title", action="store_true", help="prepend the article title to BM25 text")
    ap.add_argument("--extra-jsonl", help="more documents (random vectors): for timing at scale")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--candidates", type=int, default=50)
    ap.add_argument("--per-question", help="also write each question's metrics per mode (JSONL)")
    args = ap.parse_args()

    import bm25s
    import numpy as np
    import Stemmer

    docs, questions = load_squad(args.squad)
    extra = load_jsonl(args.extra_jsonl) if args.extra_jsonl else []
    if args.limit:
        questions = questions[: args.limit]
    ids = [d for d, _, _ in docs + extra]
    texts = [(f"{t}\n{x}" if args.title else x) for _, t, x in docs + extra]

    stemmer = Stemmer.Stemmer("english")
    t0 = time.perf_counter()
    retriever = bm25s.BM25()
    retriever.index(bm25s.tokenize(texts, stopwords="en", stemmer=stemmer, show_progress=False), show_progress=False)
    bm25_index_s = time.perf_counter() - t0

    emb = Embedder(args.model_dir, args.threads)
    t0 = time.perf_counter()
    doc_vecs = emb.embed([f"{t}\n{x}" for _, t, x in docs])
    embed_docs_s = time.perf_counter() - t0
    if extra:
        rng = np.random.default_rng(7)
        noise = rng.standard_normal((len(extra), doc_vecs.shape[1])).astype(np.float32)
        noise /= np.linalg.norm(noise, axis=1, keepdims=True)
        doc_vecs = np.concatenate([doc_vecs, noise])
    query_vecs = emb.embed([q for q, _, _ in questions])

    c = min(args.candidates, len(docs))
    per_mode = {m: [] for m in ("bm25", "dense", "hybrid_weighted", "hybrid_rrf")}
    times = {m: [] for m in per_mode}
    for qi, (q, gold, _) in enumerate(questions):
        t0 = time.perf_counter()
        qt = bm25s.tokenize([q], stopwords="en", stemmer=stemmer, show_progress=False)
        if len(qt.vocab) == 0:
            bm25 = []
        else:
            r, s = retriever.retrieve(qt, k=c, show_progress=False, n_threads=1)
            bm25 = [(int(d), float(x)) for d, x in zip(r[0], s[0]) if x > 0]
        t_bm25 = time.perf_counter() - t0
        t0 = time.perf_counter()
        sims = doc_vecs @ query_vecs[qi]
        top = np.argpartition(-sims, c - 1)[:c]
        top = top[np.argsort(-sims[top])]
        dense = [(int(d), float(sims[d])) for d in top]
        t_dense = time.perf_counter() - t0
        for mode, ranked, t in (
            ("bm25", [d for d, _ in bm25], t_bm25),
            ("dense", [d for d, _ in dense], t_dense),
        ):
            per_mode[mode].append(score([ids[d] for d in ranked], gold))
            times[mode].append(t)
        for method in ("weighted", "rrf"):
            t0 = time.perf_counter()
            fused = fuse(bm25, dense, method)
            t_fuse = time.perf_counter() - t0
            per_mode[f"hybrid_{method}"].append(score([ids[d] for d in fused], gold))
            times[f"hybrid_{method}"].append(t_bm25 + t_dense + t_fuse)

    result = {
        "peer": f"bm25s {bm25s.__version__} (lucene, k1 1.5, b 0.75, en stopwords, Snowball stemmer) "
        f"+ numpy exact cosine (all-MiniLM-L6-v2 ONNX) + fusion over {c} candidates",
        "squad": args.squad,
        "documents": len(docs) + len(extra),
        "extra_documents_random_vectors": len(extra),
        "questions": len(questions),
        "title_in_bm25": args.title,
        "bm25_index_s": bm25_index_s,
        "embed_docs_s": embed_docs_s,
        "modes": {m: {k: statistics.fmean(x[k] for x in v) for k in v[0]} for m, v in per_mode.items()},
        "search_ms_without_embedding": {
            m: {"p50": 1e3 * statistics.median(t), "p95": 1e3 * percentile(t, 95)} for m, t in times.items()
        },
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    if args.per_question:
        names = {"hybrid_weighted": "hybrid"}
        with open(args.per_question, "w") as f:
            for m, rows in per_mode.items():
                for (_, _, qid), row in zip(questions, rows):
                    f.write(json.dumps({**row, "id": qid, "mode": names.get(m, m)}) + "\n")
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    print(f"peer on {args.squad}: {len(docs) + len(extra)} documents, {len(questions)} questions")
    print(f"{'mode':16} {'R@1':>6} {'R@5':>6} {'R@10':>6} {'MRR@10':>7} {'nDCG@10':>8} {'p50 ms':>7} {'p95 ms':>7}")
    for m, v in result["modes"].items():
        t = result["search_ms_without_embedding"][m]
        print(
            f"{m:16} {v['recall@1']:6.3f} {v['recall@5']:6.3f} {v['recall@10']:6.3f} "
            f"{v['mrr@10']:7.3f} {v['ndcg@10']:8.3f} {t['p50']:7.2f} {t['p95']:7.2f}"
        )


if __name__ == "__main__":
    sys.exit(main())
