"""The Hugging Face peer of `domainrag train` (a measuring stick, never a product dependency):
LoRA with peft + transformers + torch on CPU, on the same triplets and base model.

Reads domainrag's triplets JSONL (query, context, answer), builds each prompt exactly as
domainrag's `rag::build_messages_from_context` does (system line + numbered sources + question)
through the base model's chat template, trains on the answer tokens only (prompt labels -100),
then answers held-out SQuAD questions over their gold paragraph (source [1]) greedily and scores
token F1 / exact match with the SQuAD normalisation. Writes one JSON object on stdout.
"""

import argparse
import collections
import json
import math
import random
import re
import string
import time

import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer

# Same text as SYSTEM_PROMPT and build_messages_from_context in src/rag.rs.
SYSTEM_PROMPT = (
    "You answer questions using only the numbered sources you are given. Cite the sources you "
    "use with their numbers in brackets, like [1]. If the sources do not contain the answer, "
    'say "I don\'t know."'
)


def messages(query: str, context: str) -> list:
    user = f"{context}Question: {query}\nAnswer briefly from the sources and cite them like [1]."
    return [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": user}]


def normalize(s: str) -> str:
    s = s.lower()
    s = "".join(ch for ch in s if ch not in set(string.punctuation))
    s = re.sub(r"\b(a|an|the)\b", " ", s)
    return " ".join(s.split())


def f1(pred: str, golds: list) -> float:
    best = 0.0
    p = normalize(pred).split()
    for g in golds:
        gt = normalize(g).split()
        common = collections.Counter(p) & collections.Counter(gt)
        same = sum(common.values())
        if same == 0 or not p or not gt:
            continue
        prec, rec = same / len(p), same / len(gt)
        best = max(best, 2 * prec * rec / (prec + rec))
    return best


def strip_citations(text: str) -> str:
    return re.sub(r"\[\d+(,\s*\d+)*\]", "", text).strip()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--base", required=True)
    ap.add_argument("--triplets", required=True)
    ap.add_argument("--eval-squad", required=True)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--alpha", type=float, default=32)
    ap.add_argument("--dropout", type=float, default=0.05)
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--max-new-tokens", type=int, default=32)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    random.seed(args.seed)

    tok = AutoTokenizer.from_pretrained(args.base)
    model = AutoModelForCausalLM.from_pretrained(args.base, dtype=torch.float32)
    end_of_turn = tok.convert_tokens_to_ids("<|im_end|>")

    def prompt_ids(query, context):
        return tok.apply_chat_template(
            messages(query, context), add_generation_prompt=True, tokenize=True,
            return_dict=False,
        )

    def evaluate(m, label):
        m.eval()
        squad = json.load(open(args.eval_squad))
        scores, ems, n = [], [], 0
        started = time.perf_counter()
        for a in squad["data"]:
            for p in a["paragraphs"]:
                for q in p["qas"]:
                    context = f"Sources:\n[1] {a['title']}\n{p['context']}\n\n"
                    ids = torch.tensor([prompt_ids(q["question"], context)])
                    with torch.no_grad():
                        out = m.generate(
                            input_ids=ids, max_new_tokens=args.max_new_tokens, do_sample=False,
                            eos_token_id=end_of_turn, pad_token_id=end_of_turn,
                        )
                    text = tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
                    golds = [x["text"] for x in q["answers"]]
                    pred = strip_citations(text)
                    scores.append(f1(pred, golds))
                    ems.append(float(any(normalize(pred) == normalize(g) for g in golds)))
                    n += 1
        return {
            "arm": label, "questions": n, "f1": 100 * sum(scores) / n, "em": 100 * sum(ems) / n,
            "seconds": time.perf_counter() - started,
        }

    base_eval = evaluate(model, "base")

    examples = []
    for line in open(args.triplets):
        t = json.loads(line)
        p = prompt_ids(t["query"], t["context"])
        a = tok(t["answer"], add_special_tokens=False)["input_ids"] + [end_of_turn]
        examples.append((p + a, [-100] * len(p) + a))
    config = LoraConfig(
        r=args.rank, lora_alpha=args.alpha, lora_dropout=args.dropout,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                        "down_proj"],
        task_type="CAUSAL_LM",
    )
    peft_model = get_peft_model(model, config)
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    opt = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=args.lr)
    total = len(examples) * args.epochs

    def lr_at(step):
        if step < args.warmup:
            return (step + 1) / args.warmup
        return max(0.0, (total - step) / max(1, total - args.warmup))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    peft_model.train()
    tokens, step, losses = 0, 0, []
    started = time.perf_counter()
    for _epoch in range(args.epochs):
        order = list(range(len(examples)))
        random.shuffle(order)
        for i in order:
            ids, labels = examples[i]
            out = peft_model(input_ids=torch.tensor([ids]), labels=torch.tensor([labels]))
            out.loss.backward()
            torch.nn.utils.clip_grad_norm_(peft_model.parameters(), 1.0)
            opt.step()
            sched.step()
            opt.zero_grad()
            tokens += len(ids)
            step += 1
            losses.append(out.loss.item())
    train_s = time.perf_counter() - started
    lora_eval = evaluate(peft_model, "lora")
    print(json.dumps({
        "engine": f"peft {__import__('peft').__version__} + transformers "
                  f"{__import__('transformers').__version__} + torch {torch.__version__}",
        "threads": args.threads, "trainable_params": trainable, "steps": step,
        "train_s": train_s, "tokens": tokens, "tokens_per_s": tokens / train_s,
        "s_per_step": train_s / step, "first_loss": sum(losses[:20]) / 20,
        "last_loss": sum(losses[-20:]) / 20,
        "base": base_eval, "lora": lora_eval,
        "peak_rss_mib": __import__("resource").getrusage(
            __import__("resource").RUSAGE_SELF).ru_maxrss / 1024,
    }))


if __name__ == "__main__":
    main()
