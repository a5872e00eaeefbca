#!/usr/bin/env python3
"""What each adapter costs a served answer, against the base model, on the same questions.

Starts `domainrag serve` (the engine from the environment, e.g. DOMAINRAG__GENERATE__ENGINE=native),
asks each of --questions distinct questions once per arm through POST /api/collections/C/ask (the
base model and every --adapter), the arms in a rotated order per question so that a change in the
machine's load falls on all of them alike, and reports per arm:
  - the median time to first token (retrieval + prefill of the prompt and the adapter's virtual
    tokens) and the median over questions of its ratio to the base's on the same question;
  - the median decode time per token after the first, (total - first token) / (completion tokens
    - 1), over answers of at least 2 tokens.
The first question is asked once per arm before measuring (warm-up: the engine loads each adapter
on its first request).

  adapter_overhead.py --bin BIN --data-dir DIR --collection C --questions FILE \\
      --adapter A --adapter B [--n 30] [--max-tokens 64] --out FILE.json

Standard library only; the server helpers are benches/soak.py's.
"""

import argparse
import json
import statistics
import sys

import soak


def ask(url, question, adapter):
    a = soak.http_json(url, {"question": question, "adapter": adapter})
    t = a["timings_ms"]
    decode = None
    if a["completion_tokens"] >= 2:
        decode = (t["total"] - t["first_token"]) / (a["completion_tokens"] - 1)
    return {"first_token_ms": t["first_token"], "decode_ms_per_token": decode,
            "completion_tokens": a["completion_tokens"], "prompt_tokens": a["prompt_tokens"],
            "adapter": a["adapter"]}


def summarise(runs, base_runs):
    ttft = [r["first_token_ms"] for r in runs]
    decode = [r["decode_ms_per_token"] for r in runs if r["decode_ms_per_token"] is not None]
    return {
        "median_first_token_ms": round(statistics.median(ttft), 1),
        "first_token_ratio_vs_base": round(statistics.median(
            r["first_token_ms"] / b["first_token_ms"] for r, b in zip(runs, base_runs)), 3),
        "median_decode_ms_per_token": round(statistics.median(decode), 2) if decode else None,
        "answers_with_2_tokens_or_more": len(decode),
        "median_completion_tokens": statistics.median(r["completion_tokens"] for r in runs),
        "median_prompt_tokens": statistics.median(r["prompt_tokens"] for r in runs),
    }


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bin", required=True)
    p.add_argument("--data-dir", required=True)
    p.add_argument("--models-dir")
    p.add_argument("--collection", required=True)
    p.add_argument("--questions", required=True)
    p.add_argument("--adapter", action="append", default=[])
    p.add_argument("--n", type=int, default=30)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--server-log")
    p.add_argument("--start-timeout", type=float, default=300)
    p.add_argument("--out")
    args = p.parse_args()
    arms = [None] + args.adapter
    questions = soak.load_questions(args.questions, args.n + 1)
    port = soak.free_port()
    proc = soak.start_server(args, port)
    url = f"http://127.0.0.1:{port}/api/collections/{args.collection}/ask"
    runs = {arm: [] for arm in arms}
    try:
        for arm in arms:
            ask(url, questions[0], arm)
        for i, q in enumerate(questions[1:]):
            for j in range(len(arms)):
                arm = arms[(i + j) % len(arms)]
                runs[arm].append(ask(url, q, arm))
            print(f"adapter_overhead: {i + 1}/{args.n} questions", file=sys.stderr)
    finally:
        soak.stop_server(args, proc)
    result = {"collection": args.collection, "questions": args.n, "max_tokens": args.max_tokens,
              "arms": {arm or "none": summarise(runs[arm], runs[None]) for arm in arms}}
    print("| arm | median TTFT ms | TTFT / base (median) | decode ms/token | answers >= 2 tokens |")
    print("|---|---|---|---|---|")
    for arm, s in result["arms"].items():
        decode = s["median_decode_ms_per_token"]
        print(f"| {arm} | {s['median_first_token_ms']:.0f} | {s['first_token_ratio_vs_base']:.2f}x | "
              f"{'-' if decode is None else f'{decode:.1f}'} | {s['answers_with_2_tokens_or_more']} |")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
