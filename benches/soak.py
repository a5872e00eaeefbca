#!/usr/bin/env python3
"""Memory soak: does the appliance's resident memory stay flat while it answers?

Two modes, one rule for what "flat" means (least-squares RSS slope after a warm-up):

  soak.py server --bin BIN --data-dir DIR --collection C --questions FILE --answers 500 \
      [--adapter NAME]... [--out bench/soak.json]
      Starts `BIN serve` on a free loopback port, asks N distinct questions one after another
      through POST /api/collections/C/ask (the base model and each --adapter in turn, one
      distinct question each), and reads the server's VmRSS from /proc after every answer, once
      the background scorer has judged it (--no-wait-for-scorer: at once).

  soak.py eval --report REPORT.json [--out bench/soak-eval.json]
      Reads the RSS series that `domainrag eval answers --json REPORT.json` records after every
      answer (all arms in order) and applies the same rule.

Writes JSON (series, peak, growth per 100 answers after warm-up, KV cache of one answer for
scale) and prints a short Markdown table. Standard library only: the test suite runs it too.
"""

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import time
import urllib.error
import urllib.request


def status_mib(pid, field):
    """One memory line of process `pid`'s /proc status now (VmRSS, RssAnon, RssFile), in MiB."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024.0
    raise RuntimeError(f"no {field} for pid {pid}")


def rss_mib(pid):
    """Resident memory of process `pid` now, in MiB (Linux /proc)."""
    return status_mib(pid, "VmRSS")


def metric(base_url, name):
    """One unlabelled series of the server's /metrics now (None when the server has no such series)."""
    req = urllib.request.Request(base_url + "/metrics", headers={"authorization": f"Bearer {KEY['token']}"})
    with urllib.request.urlopen(req, timeout=60) as r:
        for line in r.read().decode().splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
    return None


def heap_in_use_mib(base_url):
    """The server's live heap allocations (`domainrag_heap_in_use_bytes` in /metrics), in MiB."""
    b = metric(base_url, "domainrag_heap_in_use_bytes")
    return None if b is None else b / (1024.0 * 1024.0)


def wait_for_idle_scorer(base_url, timeout=120.0):
    """Wait until the background faithfulness scorer has judged every logged answer
    (`domainrag_answer_scoring_pending` 0; servers without the gauge count as idle). A reading
    taken while it works catches its transient buffers (+25-35 MiB): noise, not growth. Returns
    the seconds waited."""
    t0 = time.time()
    while time.time() - t0 < timeout:
        if not metric(base_url, "domainrag_answer_scoring_pending"):
            break
        time.sleep(0.05)
    return time.time() - t0


def slope_per_answer(series):
    """Least-squares slope of the series against the answer index (MiB per answer)."""
    n = len(series)
    if n < 2:
        return 0.0
    xs = range(n)
    mx = (n - 1) / 2.0
    my = sum(series) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    sxy = sum((x - mx) * (y - my) for x, y in zip(xs, series))
    return sxy / sxx


def slope_ci95_per_answer(series):
    """Half-width of the 95% interval of that slope (ordinary least squares, normal residuals):
    the RSS of a process that does not grow still moves by tens of MiB from answer to answer as
    the allocator reuses and returns pages, and this says how far the slope is from zero by noise."""
    n = len(series)
    if n < 3:
        return float("inf")
    b = slope_per_answer(series)
    mx = (n - 1) / 2.0
    my = sum(series) / n
    sxx = sum((x - mx) ** 2 for x in range(n))
    residuals = sum((y - (my + b * (x - mx))) ** 2 for x, y in enumerate(series))
    return 1.96 * (residuals / (n - 2) / sxx) ** 0.5


def summarise(series, warmup):
    """The verdict numbers of an RSS series sampled after every answer."""
    if len(series) <= warmup + 1:
        raise SystemExit(
            f"soak: {len(series)} answers is too few for a warm-up of {warmup}; "
            "ask for more answers or a shorter --warmup"
        )
    after = series[warmup:]
    return {
        "answers": len(series),
        "warmup_answers": warmup,
        "start_mib": round(series[0], 1),
        "after_warmup_mib": round(after[0], 1),
        "end_mib": round(series[-1], 1),
        "peak_mib": round(max(series), 1),
        "growth_mib_per_100_answers": round(100.0 * slope_per_answer(after), 3),
        "growth_ci95_mib_per_100_answers": round(100.0 * slope_ci95_per_answer(after), 3),
        "rss_mib": [round(x, 1) for x in series],
    }


def kv_mib_per_token(model_dir):
    """f32 KV cache of one token for the model in `model_dir` (config.json), in MiB."""
    with open(os.path.join(model_dir, "config.json")) as f:
        c = json.load(f)
    head_dim = c.get("head_dim") or c["hidden_size"] // c["num_attention_heads"]
    kv_heads = c.get("num_key_value_heads", c["num_attention_heads"])
    return c["num_hidden_layers"] * 2 * kv_heads * head_dim * 4 / 2**20


def load_questions(path, n):
    """`n` distinct questions from a SQuAD JSON file or a JSONL file of {"query": ...}."""
    with open(path) as f:
        text = f.read()
    if path.endswith(".jsonl"):
        qs = [json.loads(line)["query"] for line in text.splitlines() if line.strip()]
    else:
        qs = [
            qa["question"]
            for article in json.loads(text)["data"]
            for p in article["paragraphs"]
            for qa in p["qas"]
        ]
    distinct = list(dict.fromkeys(q.strip() for q in qs if q.strip()))
    if len(distinct) < n:
        raise SystemExit(f"soak: {path} has {len(distinct)} distinct questions, {n} asked for")
    return distinct[:n]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


KEY = {"token": None}


def http_json(url, body=None, timeout=600):
    data = None if body is None else json.dumps(body).encode()
    headers = {"content-type": "application/json"}
    if KEY["token"]:
        headers["authorization"] = f"Bearer {KEY['token']}"
    req = urllib.request.Request(url, data=data, headers=headers)
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.loads(r.read() or b"null")


def start_server(args, port):
    cmd = [args.bin, "--data-dir", args.data_dir]
    if args.models_dir:
        cmd += ["--models-dir", args.models_dir]
    env = dict(os.environ, DOMAINRAG__SERVER__BIND=f"127.0.0.1:{port}")
    # Auth is on by default: a key for this run, revoked when it ends (run_server).
    made = json.loads(subprocess.check_output(cmd + ["keys", "create", "--admin", "--name", "soak", "--json"]))
    KEY["token"], KEY["id"] = made["token"], made["id"]
    if args.max_tokens:
        env["DOMAINRAG__GENERATE__MAX_TOKENS"] = str(args.max_tokens)
    log = open(args.server_log, "w") if args.server_log else subprocess.DEVNULL
    proc = subprocess.Popen(cmd + ["serve"], env=env, stdout=log, stderr=log)
    deadline = time.time() + args.start_timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"soak: the server exited with {proc.returncode} while starting")
        try:
            http_json(f"http://127.0.0.1:{port}/readyz", timeout=5)
            return proc
        except (urllib.error.URLError, ConnectionError, OSError):
            time.sleep(0.5)
    proc.kill()
    raise SystemExit(f"soak: the server was not ready within {args.start_timeout} s")


def stop_server(args, proc):
    """Stop the server that start_server started and revoke its key."""
    proc.terminate()
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
    subprocess.run([args.bin, "--data-dir", args.data_dir, "keys", "revoke", KEY["id"]],
                   stdout=subprocess.DEVNULL, check=False)


def growth(series, warmup):
    """Peak and growth per 100 answers (with its 95% CI) of one series besides RSS."""
    a = summarise(series, warmup)
    return {k: a[k] for k in ("peak_mib", "growth_mib_per_100_answers", "growth_ci95_mib_per_100_answers")}


# Series of an `eval answers` report besides RSS: (name here, key in the report's `memory`).
EXTRA_SERIES = [("anon", "rss_anon_mib_after_answer"), ("file", "rss_file_mib_after_answer"),
                ("heap", "heap_in_use_mib_after_answer")]


def run_server(args):
    distinct = load_questions(args.questions, -(-args.answers // args.repeat))
    questions = [q for q in distinct for _ in range(args.repeat)][: args.answers]
    port = free_port()
    proc = start_server(args, port)
    base_url = f"http://127.0.0.1:{port}"
    url = f"{base_url}/api/collections/{args.collection}/ask"
    series, latencies, ttfts, tokens, arms, scorer_waits = [], [], [], [], [], []
    # Beside RSS, as `eval answers` records them: anonymous and file-backed pages, and the heap
    # in use (live allocations only: it tells live objects kept from allocator growth).
    extra = {name: [] for name, _ in EXTRA_SERIES}
    rotation = [None] + (args.adapter or [])
    started = time.time()
    try:
        idle = rss_mib(proc.pid)
        for i, q in enumerate(questions):
            # Mixed traffic: the base model and each adapter in turn (per distinct question, so
            # that repeats of a question go to the same model).
            adapter = rotation[(i // args.repeat) % len(rotation)]
            t0 = time.time()
            a = http_json(url, {"question": q, "adapter": adapter})
            latencies.append(time.time() - t0)
            ttfts.append(a["timings_ms"]["first_token"])
            tokens.append(a["prompt_tokens"] + a["completion_tokens"])
            arms.append(a["adapter"] or "base")
            if args.wait_for_scorer:
                scorer_waits.append(wait_for_idle_scorer(base_url))
            series.append(rss_mib(proc.pid))
            extra["anon"].append(status_mib(proc.pid, "RssAnon"))
            extra["file"].append(status_mib(proc.pid, "RssFile"))
            extra["heap"].append(heap_in_use_mib(base_url))
            if args.progress and (i + 1) % args.progress == 0:
                print(f"soak: {i + 1} answers, rss {series[-1]:.0f} MiB (anon {extra['anon'][-1]:.0f}, "
                      f"file {extra['file'][-1]:.0f}, heap in use {extra['heap'][-1] or 0:.0f})", file=sys.stderr)
    finally:
        stop_server(args, proc)
    result = summarise(series, args.warmup)
    for name, values in extra.items():
        if values and None not in values:
            result[name] = growth(values, args.warmup)
            result[name + "_mib"] = [round(x, 1) for x in values]
    result.update(
        mode="server",
        collection=args.collection,
        adapter=args.adapter,
        answers_per_arm={arm: arms.count(arm) for arm in sorted(set(arms))},
        idle_mib=round(idle, 1),
        seconds=round(time.time() - started, 1),
        seconds_per_answer_median=round(statistics.median(latencies), 3),
        first_token_ms_median=round(statistics.median(ttfts), 1),
        tokens_per_answer_median=statistics.median(tokens),
        max_tokens=args.max_tokens,
        repeat=args.repeat,
        readings_after_idle_scorer=args.wait_for_scorer,
    )
    if scorer_waits:
        result["scorer_wait_s_median"] = round(statistics.median(scorer_waits), 3)
    if args.repeat > 1:
        # First asks against repeats: what a cache of earlier prompts saves.
        firsts = [t for i, t in enumerate(ttfts) if i % args.repeat == 0]
        repeats = [t for i, t in enumerate(ttfts) if i % args.repeat != 0]
        result["first_token_ms_median_first_ask"] = round(statistics.median(firsts), 1)
        result["first_token_ms_median_repeat"] = round(statistics.median(repeats), 1)
    if args.model_dir:
        per_token = kv_mib_per_token(args.model_dir)
        result["kv_cache_mib_per_answer_median"] = round(per_token * result["tokens_per_answer_median"], 2)
    return result


def run_eval(args):
    with open(args.report) as f:
        report = json.load(f)
    series = report["memory"]["rss_mib_after_answer"]
    result = summarise(series, args.warmup)
    result.update(mode="eval", report=args.report, arms=sorted(report["arms"]))
    # Each arm answers every question in turn, and its first answer may build its model: the
    # same rule per arm, each with its own warm-up (arms in run order).
    n = report["questions"]
    # Reports since 2026-12-03 also split resident memory into anonymous pages (heap, weights:
    # where a leak shows) and file-backed ones (mapped index and model files: bounded by their size);
    # since 2026-12-04 they add the heap in use (glibc mallinfo2: live allocations only), which
    # tells live objects kept from allocator growth.
    extra = {name: report["memory"].get(key) or [] for name, key in EXTRA_SERIES}
    result["per_arm_in_run_order"] = []
    for i in range(0, len(series), n):
        arm = {k: v for k, v in summarise(series[i : i + n], args.warmup).items() if k != "rss_mib"}
        for name, values in extra.items():
            if values:
                arm[name] = growth(values[i : i + n], args.warmup)
        result["per_arm_in_run_order"].append(arm)
    for name, values in extra.items():
        if values:
            result[name + "_mib"] = [round(x, 1) for x in values]
    return result


def table(r):
    cols = list(range(0, r["answers"], r["every"])) + [r["answers"] - 1]
    cols = sorted(set(cols))
    head = " | ".join(str(i + 1) for i in cols)
    rss = " | ".join("%.0f" % r["rss_mib"][i] for i in cols)
    return "\n".join([
        f"| answers | {head} |",
        "|---|" + "---|" * len(cols),
        f"| RSS MiB | {rss} |",
    ] + [
        f"| {name} MiB | " + " | ".join("%.0f" % r[key][i] for i in cols) + " |"
        for name, key in (("anonymous", "anon_mib"), ("file-backed", "file_mib"), ("heap in use", "heap_mib"))
        if key in r
    ] + [
        "",
        "peak %.0f MiB; growth after %d warm-up answers: %+.2f MiB per 100 answers (95%% CI +-%.2f)"
        % (r["peak_mib"], r["warmup_answers"], r["growth_mib_per_100_answers"],
           r["growth_ci95_mib_per_100_answers"]),
    ])


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="mode", required=True)
    s = sub.add_parser("server", help="drive `domainrag serve` over HTTP")
    s.add_argument("--bin", required=True)
    s.add_argument("--data-dir", required=True)
    s.add_argument("--models-dir")
    s.add_argument("--collection", required=True)
    s.add_argument("--questions", required=True, help="SQuAD JSON or JSONL with a `query` field")
    s.add_argument("--answers", type=int, default=500)
    s.add_argument("--repeat", type=int, default=1,
                   help="ask each question this many times in a row (to measure caching; the memory soak uses 1)")
    s.add_argument("--adapter", action="append",
                   help="repeatable: the base model and each adapter answer in turn")
    s.add_argument("--max-tokens", type=int, help="sets DOMAINRAG__GENERATE__MAX_TOKENS")
    s.add_argument("--model-dir", help="base model dir (config.json), to report one answer's KV cache")
    s.add_argument("--server-log")
    s.add_argument("--start-timeout", type=float, default=600)
    s.add_argument("--progress", type=int, default=0, help="print a line every N answers")
    s.add_argument("--no-wait-for-scorer", dest="wait_for_scorer", action="store_false",
                   help="read memory right after each answer, even while the background scorer works")
    e = sub.add_parser("eval", help="read the RSS series of an `eval answers --json` report")
    e.add_argument("--report", required=True)
    for q in (s, e):
        q.add_argument("--warmup", type=int, default=50, help="answers left out of the slope")
        q.add_argument("--every", type=int, default=50, help="table column every N answers")
        q.add_argument("--out", help="write the JSON here")
    args = p.parse_args()
    result = run_server(args) if args.mode == "server" else run_eval(args)
    result["every"] = args.every
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    print(table(result))
    for i, arm in enumerate(result.get("per_arm_in_run_order", [])):
        print("arm %d (answers %d..%d): %+.2f MiB per 100 answers (95%% CI +-%.2f) after %d warm-up, peak %.0f MiB"
              % (i + 1, i * arm["answers"] + 1, (i + 1) * arm["answers"], arm["growth_mib_per_100_answers"],
                 arm["growth_ci95_mib_per_100_answers"], arm["warmup_answers"], arm["peak_mib"]))
        print_extra(arm)
    print_extra(result)


def print_extra(r):
    """The anonymous-page, file-backed-page and heap-in-use lines of a run or arm that has them."""
    for name, label in (("anon", "anonymous pages"), ("file", "file-backed pages"), ("heap", "heap in use")):
        if name in r:
            print("  %s: %+.2f MiB per 100 answers (95%% CI +-%.2f), peak %.0f MiB"
                  % (label, r[name]["growth_mib_per_100_answers"],
                     r[name]["growth_ci95_mib_per_100_answers"], r[name]["peak_mib"]))


if __name__ == "__main__":
    main()
