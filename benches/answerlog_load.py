#!/usr/bin/env python3
"""What the answer log costs an ask: wrk against `domainrag serve` on loopback, with the log on
and off (`DOMAINRAG__ANSWERS__ENABLED`), in alternating rounds on the same data dir.

  answerlog_load.py --bin BIN --data-dir DIR --collection C [--rounds 4] [--seconds 45]
      [--connections 1] [--max-tokens 8] [--engine native] [--out bench/answerlog/load.json]

Asks are kept short (native engine, 2 sources in 300 tokens, 8 answer tokens) so that the log's
fixed cost per ask is as large a share of the latency as it gets. Each round starts the server
with the log on or off (auth off, loopback only), warms it with a
few asks, then runs `wrk -t1 -c CONNECTIONS -d SECONDS --latency` with a Lua script that cycles
through distinct questions (POST /api/collections/C/ask). Reports per round requests, p50, p90
and p99 latency, and the medians over rounds of each setting, with the ratio on/off; and, since
rounds differ by more than the log costs on a shared machine, the server's own timing of the log
on the asking path (/metrics: assignment before generation plus the write after it) per answer
and as a share of answer time.
Writes JSON and prints a Markdown table. Needs `wrk` (Debian: apt-get install wrk).
"""

import argparse
import json
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request

QUESTIONS = [
    "How do I ask a question from the command line?",
    "What does the house adapter do?",
    "How are API keys stored?",
    "What is the native generation engine?",
    "How do I back up a data dir?",
    "What does collection tune do?",
    "How is hybrid retrieval fused?",
    "What happens when a client disconnects?",
    "How do I train an adapter from my documents?",
    "What is recorded in the audit log?",
    "How do experiments assign users to arms?",
    "How are PDF files read?",
]

LUA = """
local questions = %s
local i = 0
request = function()
  i = i + 1
  local q = questions[(i %% #questions) + 1]
  local body = '{"question": "' .. q .. '", "user": "load-' .. (i %% 17) .. '"}'
  return wrk.format("POST", "/api/collections/%s/ask", {["Content-Type"] = "application/json"}, body)
end
"""


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(args, enabled):
    port = free_port()
    env = dict(os.environ)
    env.update(
        {
            "DOMAINRAG__SERVER__AUTH": "false",
            "DOMAINRAG__ANSWERS__ENABLED": "true" if enabled else "false",
            "DOMAINRAG__GENERATE__MAX_TOKENS": str(args.max_tokens),
            "DOMAINRAG__GENERATE__QUEUE_DEPTH": "64",
            # Short asks (the native engine, a small context, few tokens) make the log's share of
            # the latency as large as it gets: an upper bound for ordinary asks.
            "DOMAINRAG__GENERATE__ENGINE": args.engine,
            "DOMAINRAG__RAG__MAX_SOURCES": "2",
            "DOMAINRAG__RAG__CONTEXT_TOKENS": "300",
        }
    )
    env.pop("DOMAINRAG_ENV", None)
    proc = subprocess.Popen(
        [args.bin, "--data-dir", args.data_dir, "serve", "--bind", f"127.0.0.1:{port}"]
        + (["--models-dir", args.models_dir] if args.models_dir else []),
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    base = f"http://127.0.0.1:{port}"
    for _ in range(600):
        try:
            with urllib.request.urlopen(f"{base}/readyz", timeout=2) as r:
                if r.status == 200:
                    return proc, base
        except OSError:
            time.sleep(0.2)
    proc.kill()
    raise SystemExit("answerlog_load: the server did not become ready")


def ask(base, collection, question):
    body = json.dumps({"question": question}).encode()
    req = urllib.request.Request(
        f"{base}/api/collections/{collection}/ask",
        data=body,
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(req, timeout=300) as r:
        return json.load(r)


UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3}


def parse_ms(text):
    m = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text)
    if not m:
        raise ValueError(f"unreadable wrk latency {text!r}")
    return float(m.group(1)) * UNITS[m.group(2)]


def run_wrk(args, base, script):
    out = subprocess.run(
        [
            "wrk",
            "-t1",
            f"-c{args.connections}",
            f"-d{args.seconds}s",
            "--timeout",
            "120s",
            "--latency",
            "-s",
            script,
            base,
        ],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    pct = {
        p: parse_ms(v)
        for p, v in re.findall(r"^\s+(50|90|99)%\s+(\S+)\s*$", out, re.MULTILINE)
    }
    requests = int(re.search(r"(\d+) requests in", out).group(1))
    if requests == 0 or len(pct) != 3:
        raise SystemExit(f"answerlog_load: wrk completed no requests or printed no latencies:\n{out}")
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    return {
        "requests": requests,
        "non_2xx": int(errors.group(1)) if errors else 0,
        "p50_ms": pct["50"],
        "p90_ms": pct["90"],
        "p99_ms": pct["99"],
    }


def log_share(base):
    """The server's own account: seconds spent in the answer log on the asking path and in
    answering, summed over answers (warm-up included), from /metrics."""
    with urllib.request.urlopen(f"{base}/metrics", timeout=30) as r:
        text = r.read().decode()
    values = dict(re.findall(r"^(domainrag_\w+) ([\d.e+-]+)$", text, re.MULTILINE))
    answers = float(values.get("domainrag_answer_seconds_count", 0))
    log_s = float(values.get("domainrag_answer_log_seconds_sum", 0))
    answer_s = float(values.get("domainrag_answer_seconds_sum", 0))
    return {
        "answers_counted": answers,
        "log_ms_per_answer": 1e3 * log_s / answers if answers else None,
        "log_share_of_answer_time": log_s / answer_s if answer_s else None,
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--bin", required=True)
    ap.add_argument("--data-dir", required=True)
    ap.add_argument("--models-dir")
    ap.add_argument("--collection", required=True)
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--seconds", type=int, default=45)
    ap.add_argument("--connections", type=int, default=1)
    ap.add_argument("--max-tokens", type=int, default=8)
    ap.add_argument("--engine", default="native")
    ap.add_argument("--out", default="bench/answerlog/load.json")
    args = ap.parse_args()
    if not shutil.which("wrk"):
        raise SystemExit("answerlog_load: wrk not found (Debian: apt-get install wrk)")
    lua = LUA % ("{" + ", ".join(json.dumps(q) for q in QUESTIONS) + "}", args.collection)
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as f:
        f.write(lua)
        script = f.name
    rounds = []
    for r in range(args.rounds):
        for enabled in (True, False) if r % 2 == 0 else (False, True):
            proc, base = start_server(args, enabled)
            try:
                for q in QUESTIONS[:3]:
                    ask(base, args.collection, q)
                result = run_wrk(args, base, script)
                result.update(log_share(base))
            finally:
                proc.terminate()
                proc.wait(timeout=60)
            result.update({"round": r, "log": "on" if enabled else "off"})
            print(f"answerlog_load: round {r} log {result['log']}: {result}", file=sys.stderr)
            rounds.append(result)
    summary = {}
    for setting in ("on", "off"):
        rs = [x for x in rounds if x["log"] == setting]
        summary[setting] = {
            k: statistics.median(x[k] for x in rs)
            for k in ("requests", "p50_ms", "p90_ms", "p99_ms")
        }
    ratio = {
        k: summary["on"][k] / summary["off"][k] for k in ("p50_ms", "p90_ms", "p99_ms")
    }
    on = [x for x in rounds if x["log"] == "on" and x["log_ms_per_answer"] is not None]
    summary["on"]["log_ms_per_answer"] = statistics.median(x["log_ms_per_answer"] for x in on)
    summary["on"]["log_share_of_answer_time"] = statistics.median(
        x["log_share_of_answer_time"] for x in on
    )
    report = {
        "what": "ask latency under wrk with the answer log on vs off, alternating rounds",
        "settings": vars(args),
        "rounds": rounds,
        "median_over_rounds": summary,
        "ratio_on_off": ratio,
    }
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(report, f, indent=1)
    print("| answer log | requests | p50 ms | p90 ms | p99 ms |")
    print("|---|---|---|---|---|")
    for setting in ("on", "off"):
        s = summary[setting]
        print(
            f"| {setting} | {s['requests']:.0f} | {s['p50_ms']:.0f} | {s['p90_ms']:.0f} | {s['p99_ms']:.0f} |"
        )
    print(
        f"| on / off | | {ratio['p50_ms']:.3f} | {ratio['p90_ms']:.3f} | {ratio['p99_ms']:.3f} |"
    )
    print(
        f"\nIn the answer log on the asking path (server's own timing, median over rounds): "
        f"{summary['on']['log_ms_per_answer']:.2f} ms per answer, "
        f"{100 * summary['on']['log_share_of_answer_time']:.2f}% of answer time"
    )


if __name__ == "__main__":
    main()
