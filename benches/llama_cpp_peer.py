"""The llama.cpp side of `domainrag bench engines` (a measuring stick, never a runtime dependency).

Reads a JSON list of prompts ({"kind", "messages": [{"role", "content"}]}) on stdin, runs each
through llama-cpp-python's token generator with greedy decoding, and writes one sample per prompt
({"prompt_tokens", "completion_tokens", "first_token_ms", "total_ms", "text"}) as JSON on stdout.
The chat template is the GGUF's own (the same template the converted HF model carries). The KV
cache is reset before each prompt, as every prompt of a rep is new to the engine. Generation
stops at end-of-turn / end-of-text or after --max-tokens, like the Rust side.
"""

import argparse
import json
import sys
import time

from llama_cpp import Llama
from llama_cpp.llama_chat_format import Jinja2ChatFormatter


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--threads", type=int, required=True)
    ap.add_argument("--max-tokens", type=int, required=True)
    ap.add_argument("--n-ctx", type=int, default=4096)
    args = ap.parse_args()
    prompts = json.load(sys.stdin)
    llm = Llama(
        model_path=args.model,
        n_ctx=args.n_ctx,
        n_threads=args.threads,
        n_threads_batch=args.threads,
        n_gpu_layers=0,
        verbose=False,
    )
    meta = llm.metadata
    eos = llm.token_eos()
    formatter = Jinja2ChatFormatter(
        template=meta["tokenizer.chat_template"],
        eos_token=llm.detokenize([eos], special=True).decode(),
        bos_token=llm.detokenize([llm.token_bos()], special=True).decode(),
    )
    stop_ids = {eos}
    end_of_turn = llm.tokenize(b"<|im_end|>", add_bos=False, special=True)
    if len(end_of_turn) == 1:
        stop_ids.add(end_of_turn[0])

    def run(messages, max_tokens):
        rendered = formatter(messages=messages).prompt
        tokens = llm.tokenize(rendered.encode(), add_bos=False, special=True)
        llm.reset()
        started = time.perf_counter()
        first = None
        completion = []
        for t in llm.generate(tokens, top_k=1, top_p=1.0, min_p=0.0, temp=0.0, repeat_penalty=1.0):
            if first is None:
                first = time.perf_counter()
            if t in stop_ids:
                break
            completion.append(t)
            if len(completion) >= max_tokens:
                break
        total = time.perf_counter()
        return {
            "prompt_tokens": len(tokens),
            "completion_tokens": len(completion),
            "first_token_ms": ((first or total) - started) * 1e3,
            "total_ms": (total - started) * 1e3,
            "text": llm.detokenize(completion).decode("utf-8", errors="replace"),
        }

    # Warm-up (first-call allocations), as the Rust side warms its engines.
    run([{"role": "user", "content": "Hi"}], 4)
    out = [run(p["messages"], args.max_tokens) for p in prompts]
    json.dump(out, sys.stdout)


if __name__ == "__main__":
    main()
