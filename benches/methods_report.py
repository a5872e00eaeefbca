#!/usr/bin/env python3
"""Summarise `benches/peft-methods.sh` (standard library): one row per PEFT method.

Reads DIR/adapter-<method>.json (`adapters show --json`: size on disk, training record) and
DIR/eval.json (`eval answers --json`, arms none + PREFIX-<method>). Per arm:
  - trainable parameters, adapter size on disk, training wall time, tokens/s, peak RSS, best
    validation loss;
  - serving cost against the base on the same questions (from DIR/overhead.json,
    benches/adapter_overhead.py, when it is there; else from the evaluation's answers): the median
    of the per-question ratio of time to first token (retrieval + prefill, with the adapter's virtual tokens), and the median
    decode time per token after the first ((total - first token) / (completion tokens - 1), over
    answers of at least 2 tokens);
  - EM, F1, faithfulness (an answer without claims counts 1), hallucination, with the paired
    per-question difference against the base and against LoRA and its percentile-bootstrap 95%
    interval (10,000 resamples, fixed seed; benches/paired.py's).

usage: methods_report.py --dir bench/methods [--prefix methods] --methods lora ia3 prompt prefix [--out report.json]
"""

import argparse
import json
import statistics
from pathlib import Path

from paired import METRICS, interval

SCORES = ("em", "f1", "faithfulness", "hallucinated")


def per_question(report: dict, arm: str) -> dict:
    return {q["id"] or q["query"]: q for q in report["per_question"][arm]}


def paired(a: dict, b: dict, metric: str) -> dict:
    ids = [i for i in a if i in b]
    f = METRICS[metric]
    diffs = [f(b[i]) - f(a[i]) for i in ids]
    lo, hi = interval(diffs)
    return {"diff": sum(diffs) / len(diffs), "ci95": [lo, hi], "questions": len(ids)}


def decode_ms(q: dict):
    if q["completion_tokens"] < 2:
        return None
    return (q["seconds"] * 1e3 - q["first_token_ms"]) / (q["completion_tokens"] - 1)


def serving(base: dict, arm: dict) -> dict:
    ids = [i for i in arm if i in base]
    ttft = statistics.median(arm[i]["first_token_ms"] for i in ids)
    ttft_ratio = statistics.median(arm[i]["first_token_ms"] / base[i]["first_token_ms"] for i in ids)
    per_token = [d for d in (decode_ms(arm[i]) for i in ids) if d is not None]
    return {
        "median_first_token_ms": ttft,
        "first_token_ratio_vs_base": ttft_ratio,
        "median_decode_ms_per_token": statistics.median(per_token) if per_token else None,
        "answers_with_2_tokens_or_more": len(per_token),
    }


def mean(arm: dict, metric: str) -> float:
    f = METRICS[metric]
    return sum(f(q) for q in arm.values()) / len(arm)


def fmt_ci(d: dict, scale: float = 1.0, digits: int = 1) -> str:
    lo, hi = (x * scale for x in d["ci95"])
    return f"{d['diff'] * scale:+.{digits}f} ({lo:+.{digits}f}..{hi:+.{digits}f})"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dir", required=True, type=Path)
    p.add_argument("--methods", nargs="+", required=True)
    p.add_argument("--prefix", default="methods", help="the adapters are PREFIX-<method>")
    p.add_argument("--out")
    args = p.parse_args()
    report = json.loads((args.dir / "eval.json").read_text())
    # Serving cost from benches/adapter_overhead.py (arms interleaved per question) when it ran;
    # else from the evaluation, whose arms run one after another.
    overhead_path = args.dir / "overhead.json"
    overhead = json.loads(overhead_path.read_text())["arms"] if overhead_path.exists() else None
    base = per_question(report, "none")
    lora = per_question(report, f"{args.prefix}-lora") if "lora" in args.methods else None
    def serving_of(arm_name: str, arm: dict) -> dict:
        return overhead[arm_name] if overhead else serving(base, arm)

    rows = {"none": {"scores": {m: mean(base, m) for m in SCORES}, "serving": serving_of("none", base)}}
    for method in args.methods:
        shown = json.loads((args.dir / f"adapter-{method}.json").read_text())
        t = shown.get("training") or {}
        arm = per_question(report, f"{args.prefix}-{method}")
        rows[method] = {
            "trainable_params": t.get("trainable_params"),
            "size_bytes": shown["adapter"]["size_bytes"],
            "train_s": t.get("wall_s"),
            "train_tokens_per_s": t.get("tokens_per_s"),
            "train_peak_rss_mib": t.get("peak_rss_mib"),
            "best_val_loss": t.get("best_val_loss"),
            "steps": t.get("steps"),
            "scores": {m: mean(arm, m) for m in SCORES},
            "vs_base": {m: paired(base, arm, m) for m in SCORES},
            "vs_lora": {m: paired(lora, arm, m) for m in SCORES} if lora and method != "lora" else None,
            "serving": serving_of(f"{args.prefix}-{method}", arm),
        }
    n = len(base)
    print(f"## {args.dir}: {n} questions, full pipeline, native engine, one run\n")
    print("| method | trainable params | size on disk | train s | train tokens/s | peak RSS MiB | best val loss |")
    print("|---|---|---|---|---|---|---|")
    for method in args.methods:
        r = rows[method]
        print(f"| {method} | {r['trainable_params']:,} | {r['size_bytes'] / 1024:,.0f} KiB | "
              f"{r['train_s']:.0f} | {r['train_tokens_per_s']:.0f} | {r['train_peak_rss_mib']:.0f} | "
              f"{r['best_val_loss']:.3f} |")
    source = "benches/adapter_overhead.py, arms interleaved" if overhead else "the evaluation's runs"
    print(f"\nServing cost from {source}.\n")
    print("| arm | EM % | F1 | faithfulness | hallucination % | median TTFT ms (x base) | decode ms/token |")
    print("|---|---|---|---|---|---|---|")
    for name, r in rows.items():
        s, v = r["scores"], r["serving"]
        decode = v["median_decode_ms_per_token"]
        print(f"| {name} | {100 * s['em']:.1f} | {100 * s['f1']:.1f} | {s['faithfulness']:.3f} | "
              f"{100 * s['hallucinated']:.1f} | {v['median_first_token_ms']:.0f} "
              f"({v['first_token_ratio_vs_base']:.2f}x) | {'-' if decode is None else f'{decode:.1f}'} |")
    print("\nPaired differences, 95% bootstrap intervals (F1 and hallucination in points):\n")
    print("| method | F1 vs base | F1 vs LoRA | faithfulness vs base | hallucination vs base |")
    print("|---|---|---|---|---|")
    for method in args.methods:
        r = rows[method]
        vs_lora = fmt_ci(r["vs_lora"]["f1"], 100) if r["vs_lora"] else "-"
        print(f"| {method} | {fmt_ci(r['vs_base']['f1'], 100)} | {vs_lora} | "
              f"{fmt_ci(r['vs_base']['faithfulness'], 1, 3)} | {fmt_ci(r['vs_base']['hallucinated'], 100)} |")
    if args.out:
        Path(args.out).write_text(json.dumps({"questions": n, "arms": rows}, indent=1))


if __name__ == "__main__":
    main()
