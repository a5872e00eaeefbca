"""Does ONNX Runtime keep memory for every batch shape it has seen? (issue 13's eval creep)

`eval answers` embeds, for each answer, the question, the answer, its claims and every source
sentence in one call: batches of ever-different (count, length). This runs the embedding model
domainrag ships (all-MiniLM-L6-v2 ONNX) with the ONNX Runtime version it loads (1.32.0, the same
wheel), on batches of random shapes like those, in a fresh process per configuration, and reads the
process's RSS after every batch:
  default      the CPU arena allocator and memory patterns on (ORT's defaults; what fastembed uses)
  no-arena     the CPU execution provider without its arena (domainrag's setting)
  no-pattern   arena on, memory patterns off
Prints a table and writes JSON: RSS slope per 100 batches over the second half, the peak, and
the time per batch (median, one intra-op thread).

  python benches/ort_memory.py --model data/models/all-MiniLM-L6-v2/model.onnx --out bench/soak/ort-memory.json
(needs numpy and onnxruntime==1.32.0: the project's venv, ~/.cache/domainrag/venv, has both)
"""

import argparse
import json
import random

import isolated

CONFIGS = ["default", "no-arena", "no-pattern"]


def rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def run_one(model: str, config: str, batches: int, seed: int) -> dict:
    import numpy as np
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    if config == "no-pattern":
        opts.enable_mem_pattern = False
    providers = [("CPUExecutionProvider", {"arena_extend_strategy": "kNextPowerOfTwo"})]
    if config == "no-arena":
        opts.enable_cpu_mem_arena = False
    sess = ort.InferenceSession(model, opts, providers=providers)
    names = {i.name for i in sess.get_inputs()}
    rng = random.Random(seed)
    series, times = [], []
    import time
    for _ in range(batches):
        n, length = rng.randint(2, 64), rng.randint(8, 256)
        ids = np.array([[rng.randint(1000, 29000) for _ in range(length)] for _ in range(n)], dtype=np.int64)
        feed = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
        if "token_type_ids" in names:
            feed["token_type_ids"] = np.zeros_like(ids)
        started = time.perf_counter()
        sess.run(None, feed)
        times.append(time.perf_counter() - started)
        series.append(round(rss_mib(), 1))
    half = series[len(series) // 2 :]
    xs = list(range(len(half)))
    mx, my = sum(xs) / len(xs), sum(half) / len(half)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, half)) / sum((x - mx) ** 2 for x in xs)
    return {
        "config": config,
        "batches": batches,
        "slope_mib_per_100_batches": round(100 * slope, 2),
        "rss_mib_after_first": series[0],
        "rss_mib_at_half": series[len(series) // 2],
        "rss_mib_last": series[-1],
        "peak_rss_mib": max(series),
        "median_ms_per_batch": round(1000 * sorted(times)[len(times) // 2], 1),
        "total_s": round(sum(times), 1),
        "rss_mib_after_batch": series,
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--batches", type=int, default=400)
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--out")
    ap.add_argument("--one", choices=CONFIGS, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.one:
        print(json.dumps(run_one(a.model, a.one, a.batches, a.seed)))
        return
    results = isolated.run_each(__file__, ["--model", a.model, "--batches", str(a.batches),
                                           "--seed", str(a.seed)], CONFIGS)
    isolated.print_table(
        ["config", "RSS after batch 1", "at half", "last", "peak", "slope MiB/100 batches (2nd half)",
         "median ms/batch", "total s"],
        [[r[k] for k in ("config", "rss_mib_after_first", "rss_mib_at_half", "rss_mib_last", "peak_rss_mib",
                         "slope_mib_per_100_batches", "median_ms_per_batch", "total_s")] for r in results])
    if a.out:
        with open(a.out, "w") as f:
            json.dump({"onnxruntime": __import__("onnxruntime").__version__, "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
