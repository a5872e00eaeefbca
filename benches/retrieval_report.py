"""Tables for the retrieval benchmarks (benches/retrieval-*.sh); standard library only.

  retrieval_report.py peer DIR                    domainrag-<set>.json + peer-<set>.json -> summary.{json,md}
  retrieval_report.py split SQUAD TUNE CHECK      split a SQuAD file's articles in two halves (seed 7)
  retrieval_report.py tune-entry WORK SET OUT     one set's tune run -> OUT (JSON)
  retrieval_report.py tune DIR                    tune-<set>.json -> summary-tune.md
  retrieval_report.py scale DIR                   scale-*.json -> summary-scale.{json,md}
"""

import glob
import json
import statistics
import os
import random
import sys

SETS = ["squad", "newwiki", "amazon"]
METRICS = ["recall@1", "recall@5", "recall@10", "mrr@10", "ndcg@10"]


def load(path):
    with open(path) as f:
        return json.load(f)


def peer(out_dir):
    rows, summary = [], {}
    for s in SETS:
        d, p = os.path.join(out_dir, f"domainrag-{s}.json"), os.path.join(out_dir, f"peer-{s}.json")
        if not (os.path.exists(d) and os.path.exists(p)):
            continue
        d, p = load(d), load(p)
        summary[s] = {"questions": d["questions"], "domainrag": d["modes"], "peer": p["modes"]}
        for system, modes in (("domainrag", d["modes"]), ("peer", p["modes"])):
            for mode, m in modes.items():
                rows.append(f"| {s} | {system} | {mode} | " + " | ".join(f"{m[k]:.4f}" for k in METRICS) + " |")
        best_peer = max(p["modes"]["hybrid_weighted"]["recall@5"], p["modes"]["hybrid_rrf"]["recall@5"])
        summary[s]["checks"] = {
            "bm25_recall@5_vs_peer": d["modes"]["bm25"]["recall@5"] - p["modes"]["bm25"]["recall@5"],
            "bm25_ndcg@10_vs_peer": d["modes"]["bm25"]["ndcg@10"] - p["modes"]["bm25"]["ndcg@10"],
            "hybrid_recall@5_vs_best_peer_fusion": d["modes"]["hybrid"]["recall@5"] - best_peer,
            "hybrid_ndcg@10_vs_best_peer_fusion": d["modes"]["hybrid"]["ndcg@10"]
            - max(p["modes"]["hybrid_weighted"]["ndcg@10"], p["modes"]["hybrid_rrf"]["ndcg@10"]),
        }
    md = "| set | system | mode | " + " | ".join(METRICS) + " |\n|---|---|---|" + "---|" * len(METRICS) + "\n"
    md += "\n".join(rows) + "\n\n| set | BM25 R@5 - peer | BM25 nDCG@10 - peer | hybrid R@5 - best peer fusion | hybrid nDCG@10 - best peer fusion |\n|---|---|---|---|---|\n"
    for s, v in summary.items():
        c = v["checks"]
        md += f"| {s} | {c['bm25_recall@5_vs_peer']:+.4f} | {c['bm25_ndcg@10_vs_peer']:+.4f} | {c['hybrid_recall@5_vs_best_peer_fusion']:+.4f} | {c['hybrid_ndcg@10_vs_best_peer_fusion']:+.4f} |\n"
    with open(os.path.join(out_dir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    with open(os.path.join(out_dir, "summary.md"), "w") as f:
        f.write(md)
    print(md)


def split(squad, tune_path, check_path):
    data = load(squad)
    articles = list(data["data"])
    random.Random(7).shuffle(articles)
    half = len(articles) // 2
    for path, part in ((tune_path, articles[:half]), (check_path, articles[half:])):
        with open(path, "w") as f:
            json.dump({"version": data.get("version", ""), "data": part}, f)


def tune_entry(work, name, out):
    result = {"set": name}
    for how in ("qa", "synthetic"):
        before = load(os.path.join(work, f"{name}-{how}-before.json"))
        after = load(os.path.join(work, f"{name}-{how}-after.json"))
        result[how] = {
            "checked_on_questions": before["questions"],
            "tune": load(os.path.join(work, f"{name}-{how}-tune.json")),
            "before": before["modes"]["hybrid"],
            "after": after["modes"]["hybrid"],
        }
    with open(out, "w") as f:
        json.dump(result, f, indent=2)


def tune(out_dir):
    md = (
        "| set | tuned on | checked on | applied | hybrid R@5 before | after | nDCG@10 before | after | best on the tuning part | its held-out nDCG@10 gain (95%) |\n"
        "|---|---|---|---|---|---|---|---|---|---|\n"
    )
    for s in SETS:
        path = os.path.join(out_dir, f"tune-{s}.json")
        if not os.path.exists(path):
            continue
        r = load(path)
        for how, label in (("qa", "QA pairs, half the articles"), ("synthetic", "drafted questions")):
            t = r[how]
            rep = t["tune"]
            chosen = rep["best"]["settings"]
            f = chosen["fusion"]
            b = chosen["bm25"]
            desc = (f"title {b['title_weight']}, window {b.get('window_weight', 0)}, pair {b.get('pair_weight', 0)}, k1/b {b.get('k1', 1.2)}/{b.get('b', 0.75)}, "
                    f"{f['method']} {f['bm25_weight']}/{f['dense_weight']}, {f['candidates']} cand.")
            g = rep.get("held_out_gain")
            gain = f"{g['low']:+.4f}..{g['high']:+.4f}" if g else "-"
            checked = "other half" if how == "qa" else "all real questions"
            md += (
                f"| {s} | {label} ({rep['questions']}) | {checked} ({t['checked_on_questions']}) | {rep['applied']} | "
                f"{t['before']['recall@5']:.4f} | {t['after']['recall@5']:.4f} | {t['before']['ndcg@10']:.4f} | "
                f"{t['after']['ndcg@10']:.4f} | {desc} | {gain} |\n"
            )
    with open(os.path.join(out_dir, "summary-tune.md"), "w") as f:
        f.write(md)
    print(md)


def scale(out_dir):
    d = load(os.path.join(out_dir, "scale-search.json"))
    p = load(os.path.join(out_dir, "scale-peer.json"))
    q = load(os.path.join(out_dir, "scale-eval.json"))
    ing = load(os.path.join(out_dir, "scale-ingest.json"))
    hy = d["modes"]["hybrid"]["without_embedding"]
    ph = p["search_ms_without_embedding"]["hybrid_weighted"]
    summary = {
        "chunks": d["chunks"],
        "ingest": ing,
        "domainrag_hybrid_ms": {"p50": hy["p50_ms"], "p95": hy["p95_ms"]},
        "peer_hybrid_ms": ph,
        "speedup_p50": ph["p50"] / hy["p50_ms"],
        "dense_recall@10_vs_exact": d["dense_index"]["recall_at_10_vs_exact"],
        "dense_index": d["dense_index"],
        "squad_dev_at_scale": q["modes"],
    }
    md = f"collection of {d['chunks']} chunks ({ing.get('documents', '?')} documents)\n\n"
    md += "| mode | domainrag p50 ms | p95 ms | peer p50 ms | p95 ms |\n|---|---|---|---|---|\n"
    for mode, pm in (("bm25", "bm25"), ("dense", "dense"), ("hybrid", "hybrid_weighted")):
        l = d["modes"][mode]["without_embedding"]
        pl = p["search_ms_without_embedding"][pm]
        md += f"| {mode} | {l['p50_ms']:.2f} | {l['p95_ms']:.2f} | {pl['p50']:.2f} | {pl['p95']:.2f} |\n"
    di = d["dense_index"]
    md += (
        f"\nhybrid p50 speed-up over the peer: {summary['speedup_p50']:.1f}x; vector store recall@10 against exact "
        f"search {di['recall_at_10_vs_exact']:.4f} (p50 {di['search']['p50_ms']:.2f} ms vs exact {di['exact']['p50_ms']:.2f} ms)\n"
    )
    rounds = []
    r = 1
    while os.path.exists(os.path.join(out_dir, f"scale-search-{r}.json")):
        rd = load(os.path.join(out_dir, f"scale-search-{r}.json"))
        rp = load(os.path.join(out_dir, f"scale-peer-{r}.json"))
        ours = rd["modes"]["hybrid"]["without_embedding"]
        theirs = rp["search_ms_without_embedding"]["hybrid_weighted"]
        rounds.append({"round": r, "domainrag_p50": ours["p50_ms"], "domainrag_p95": ours["p95_ms"],
                       "peer_p50": theirs["p50"], "peer_p95": theirs["p95"],
                       "speedup_p50": theirs["p50"] / ours["p50_ms"], "speedup_p95": theirs["p95"] / ours["p95_ms"]})
        r += 1
    if rounds:
        summary["rounds"] = rounds
        summary["median_speedup_p50"] = statistics.median(x["speedup_p50"] for x in rounds)
        md += "\n| round (hybrid, without query embedding) | domainrag p50 / p95 ms | peer p50 / p95 ms | speed-up p50 | p95 |\n|---|---|---|---|---|\n"
        for x in rounds:
            md += (f"| {x['round']} | {x['domainrag_p50']:.2f} / {x['domainrag_p95']:.2f} | {x['peer_p50']:.2f} / {x['peer_p95']:.2f} "
                   f"| {x['speedup_p50']:.1f}x | {x['speedup_p95']:.1f}x |\n")
        md += f"\nmedian speed-up at p50 over {len(rounds)} rounds: {summary['median_speedup_p50']:.1f}x\n"
    md += "\nSQuAD dev questions at this size: | mode | " + " | ".join(METRICS) + " |\n|---|" + "---|" * len(METRICS) + "\n"
    for mode, m in q["modes"].items():
        md += f"| {mode} | " + " | ".join(f"{m[k]:.4f}" for k in METRICS) + " |\n"
    with open(os.path.join(out_dir, "summary-scale.json"), "w") as f:
        json.dump(summary, f, indent=2)
    with open(os.path.join(out_dir, "summary-scale.md"), "w") as f:
        f.write(md)
    print(md)


if __name__ == "__main__":
    cmd, args = sys.argv[1], sys.argv[2:]
    {"peer": peer, "split": split, "tune-entry": tune_entry, "tune": tune, "scale": scale}[cmd](*args)
