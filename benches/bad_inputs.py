#!/usr/bin/env python3
"""Hostile and broken inputs against the real server, one fresh `serve` per input: what status each
gets, whether the server still answers the next request, and the peak RSS while it handles the
input (the server plus its child processes, e.g. the PDF reader, sampled every 10 ms) against the
same server's RSS just before. Writes JSON and prints a table.

Usage: benches/bad_inputs.py --bin target/release/domainrag --models-dir data/models \
           --out bench/bad-inputs.json
Standard library only.
"""

import argparse
import json
import os
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
import uuid
import zlib

COLLECTION = "hostile"


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def request(base, method, path, body=None, headers=None, timeout=600):
    """(status, parsed JSON or text) of one request; (None, error) when the connection fails."""
    headers = dict(headers or {})
    data = body
    if isinstance(body, (dict, list)):
        data = json.dumps(body).encode()
        headers["Content-Type"] = "application/json"
    req = urllib.request.Request(base + path, data=data, method=method, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            raw = r.read()
            status = r.status
    except urllib.error.HTTPError as e:
        raw, status = e.read(), e.code
    except (urllib.error.URLError, ConnectionError, TimeoutError) as e:
        return None, str(e)
    try:
        return status, json.loads(raw)
    except ValueError:
        return status, raw.decode("utf-8", "replace")[:300]


def multipart(parts):
    """A multipart body of (field, file name or None for a text field, bytes) parts; returns
    (body, headers)."""
    boundary = uuid.uuid4().hex
    out = bytearray()
    for field, name, data in parts:
        out += f"--{boundary}\r\n".encode()
        if name is None:
            out += f'Content-Disposition: form-data; name="{field}"\r\n\r\n'.encode() + data + b"\r\n"
            continue
        out += f'Content-Disposition: form-data; name="{field}"; filename="{name}"\r\n'.encode()
        out += b"Content-Type: application/octet-stream\r\n\r\n" + data + b"\r\n"
    out += f"--{boundary}--\r\n".encode()
    return bytes(out), {"Content-Type": f"multipart/form-data; boundary={boundary}"}


def status_kib(pid, key):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    return 0


def tree_rss_kib(pid):
    """RSS of `pid` and its children (the PDF reader runs as a child)."""
    total = status_kib(pid, "VmRSS")
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            children = [int(c) for c in f.read().split()]
    except OSError:
        children = []
    for child in children:
        try:
            total += tree_rss_kib(child)
        except OSError:
            pass
    return total


class PeakSampler(threading.Thread):
    """Samples the process tree's RSS every 10 ms until stopped; `peak` is the largest seen."""

    def __init__(self, pid):
        super().__init__(daemon=True)
        self.pid, self.peak, self.done = pid, 0, threading.Event()

    def run(self):
        while not self.done.is_set():
            try:
                self.peak = max(self.peak, tree_rss_kib(self.pid))
            except OSError:
                return
            time.sleep(0.01)

    def stop(self):
        self.done.set()
        self.join()
        return self.peak


def pdf_bomb(refs, inflated):
    """A few-KB PDF whose page lists one compressed content stream `refs` times."""
    stream = zlib.compress(b"0 0 m\n" * (inflated // 6), 9)
    contents = " ".join(["4 0 R"] * refs)
    bodies = [
        b"<< /Type /Catalog /Pages 2 0 R >>",
        b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
        f"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Contents [{contents}] >>".encode(),
        f"<< /Length {len(stream)} /Filter /FlateDecode >>\nstream\n".encode() + stream + b"\nendstream",
    ]
    out = bytearray(b"%PDF-1.4\n")
    offsets = []
    for i, body in enumerate(bodies):
        offsets.append(len(out))
        out += f"{i + 1} 0 obj\n".encode() + body + b"\nendobj\n"
    xref = len(out)
    out += f"xref\n0 {len(bodies) + 1}\n0000000000 65535 f \n".encode()
    for off in offsets:
        out += f"{off:010} 00000 n \n".encode()
    out += f"trailer\n<< /Size {len(bodies) + 1} /Root 1 0 R >>\nstartxref\n{xref}\n%%EOF\n".encode()
    return bytes(out)


def overlapping_adapter(models_dir):
    """A PEFT LoRA adapter for the base model whose tensors all point at the same bytes."""
    base = json.load(open(os.path.join(models_dir, "SmolLM2-135M-Instruct-hf", "config.json")))
    hidden, layers, rank = base["hidden_size"], base["num_hidden_layers"], 4
    header, size = {}, rank * hidden * 4
    for layer in range(layers):
        prefix = f"base_model.model.model.layers.{layer}.self_attn.q_proj"
        header[f"{prefix}.lora_A.weight"] = {"dtype": "F32", "shape": [rank, hidden], "data_offsets": [0, size]}
        header[f"{prefix}.lora_B.weight"] = {"dtype": "F32", "shape": [hidden, rank], "data_offsets": [0, size]}
    head = json.dumps(header).encode()
    weights = struct.pack("<Q", len(head)) + head + bytes(size)
    config = json.dumps({
        "peft_type": "LORA", "r": rank, "lora_alpha": 8, "target_modules": ["q_proj"],
        "base_model_name_or_path": "HuggingFaceTB/SmolLM2-135M-Instruct", "task_type": "CAUSAL_LM",
    }).encode()
    return config, weights


def upload(base, name, data):
    body, headers = multipart([("files", name, data)])
    return request(base, "POST", f"/api/collections/{COLLECTION}/documents", body, headers)


def wait_job(base, started):
    """Wait for the job an upload started; returns (final status, its result or error)."""
    status, job = started
    if status != 202:
        return status, job
    while True:
        s, j = request(base, "GET", f"/api/jobs/{job['id']}")
        if s is None:
            return None, j
        if j["status"] not in ("queued", "running"):
            return j["status"], j.get("result") or j.get("error")
        time.sleep(0.2)


def cases(models_dir):
    long_question = " ".join(["why"] * 3000)
    deep_json = b'{"query": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    nested_html = b"<html><body>" + b"<div>" * 200_000 + b"deep text" + b"</div>" * 200_000 + b"</body></html>"
    bad_jsonl = b"{not json\n" * 300_000
    adapter = multipart([("name", None, b"shared-bytes"),
                         ("files", "adapter_config.json", overlapping_adapter(models_dir)[0]),
                         ("files", "adapter_model.safetensors", overlapping_adapter(models_dir)[1])])
    return [
        ("search of 100k '('", lambda b: request(b, "POST", f"/api/collections/{COLLECTION}/search",
                                                   {"query": "(" * 100_000, "k": 3})),
        ("question of 100k '('", lambda b: request(b, "POST", f"/api/collections/{COLLECTION}/ask",
                                                    {"question": "(" * 100_000})),
        ("question longer than the context", lambda b: request(b, "POST", f"/api/collections/{COLLECTION}/ask",
                                                                {"question": long_question})),
        ("/v1 message longer than the context", lambda b: request(b, "POST", "/v1/chat/completions", {
            "model": COLLECTION, "messages": [{"role": "user", "content": long_question}]})),
        ("JSON body nested 100k deep", lambda b: request(b, "POST", f"/api/collections/{COLLECTION}/search",
                                                          deep_json, {"Content-Type": "application/json"})),
        ("HTML of 200k nested elements", lambda b: wait_job(b, upload(b, "nested.html", nested_html))),
        ("PDF bomb (1 stream x 4000 refs, 4 GB inflated)", lambda b: wait_job(b, upload(b, "bomb.pdf", pdf_bomb(4000, 1 << 20)))),
        ("JSONL of 300k bad lines", lambda b: wait_job(b, upload(b, "bad.jsonl", bad_jsonl))),
        ("upload over server.max_upload_bytes", lambda b: upload(b, "big.txt", b"a " * (40 << 20))),
        ("adapter whose tensors share bytes", lambda b: request(b, "POST", "/api/adapters", *adapter)),
    ]


def serve(args, data_dir):
    port = free_port()
    env = dict(os.environ, DOMAINRAG__SERVER__AUTH="false", DOMAINRAG__GENERATE__MAX_TOKENS="16")
    env["DOMAINRAG__SERVER__MAX_UPLOAD_BYTES"] = str(64 << 20)
    proc = subprocess.Popen(
        [args.bin, "--data-dir", data_dir, "--models-dir", args.models_dir, "serve", "--bind", f"127.0.0.1:{port}"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    for _ in range(600):
        s, _ = request(base, "GET", "/readyz", timeout=5)
        if s == 200:
            return proc, base
        if proc.poll() is not None:
            sys.exit(f"serve exited with {proc.returncode}")
        time.sleep(0.2)
    proc.kill()
    sys.exit("serve did not become ready")


def summary(answer):
    if isinstance(answer, dict):
        if "error" in answer and isinstance(answer["error"], dict):
            return answer["error"].get("message", "")[:140]
        if "failures_total" in answer:
            first = (answer.get("failures") or [{}])[0].get("error", "")
            return f"{answer['failures_total']} failures kept {len(answer.get('failures', []))}; first: {first}"[:140]
    return str(answer)[:140]


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--bin", required=True)
    p.add_argument("--models-dir", required=True)
    p.add_argument("--out", required=True)
    args = p.parse_args()
    work = tempfile.mkdtemp(prefix="domainrag-bad-inputs-")
    data_dir = os.path.join(work, "data")
    subprocess.run([args.bin, "--data-dir", data_dir, "--models-dir", args.models_dir,
                    "collection", "create", COLLECTION], check=True, stdout=subprocess.DEVNULL)
    rows = []
    for name, run in cases(args.models_dir):
        proc, base = serve(args, data_dir)
        request(base, "POST", f"/api/collections/{COLLECTION}/search", {"query": "warm up", "k": 3})
        baseline = tree_rss_kib(proc.pid)
        sampler = PeakSampler(proc.pid)
        sampler.start()
        started = time.time()
        status, answer = run(base)
        seconds = time.time() - started
        peak = sampler.stop() if proc.poll() is None else None
        next_status, _ = request(base, "POST", f"/api/collections/{COLLECTION}/search", {"query": "still there", "k": 3})
        alive = proc.poll() is None and next_status == 200
        rows.append({
            "input": name, "status": status, "message": summary(answer), "seconds": round(seconds, 2),
            "baseline_rss_mib": round(baseline / 1024, 1),
            "peak_rss_mib": round(peak / 1024, 1) if peak else None,
            "next_request_ok": alive,
        })
        print(f"{name}: {status} in {seconds:.1f}s, peak {rows[-1]['peak_rss_mib']} MiB, next ok {alive}", file=sys.stderr)
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
    shutil.rmtree(work, ignore_errors=True)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"inputs": rows}, f, indent=2)
    print("| input | status | server answers next | baseline RSS MiB | peak RSS MiB | s | what it said |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['input']} | {r['status']} | {'yes' if r['next_request_ok'] else 'NO'} | "
              f"{r['baseline_rss_mib']} | {r['peak_rss_mib']} | {r['seconds']} | {r['message']} |")


if __name__ == "__main__":
    main()
