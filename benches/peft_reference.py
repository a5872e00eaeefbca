"""A PEFT-made adapter of a kind other than LoRA, and the greedy tokens the peft library gives
with it: the reference `tests/integration/peft_kinds.rs` checks domainrag's native engine against
(a measuring stick only; nothing in domainrag depends on peft).

For `--method prompt`: peft's PromptTuningConfig, 8 virtual tokens initialised from a text
(`prompt_tuning_init="TEXT"`: the text's token embeddings), then moved by seeded noise (sd 0.02)
so that they are not plain token embeddings. For `--method prefix`: peft's PrefixTuningConfig, 8
virtual tokens without the reparameterisation MLP; its table (per layer a key and a value of
every key/value head) is set to the keys and values the base model computes over a text
(realistic magnitudes; peft's own N(0, 1) start drowns the prompt) plus seeded noise (sd 0.02).

For `--method ia3`: peft's IA3Config on the converted base model with peft's default llama
modules ((IA)^3 scales the outputs of k_proj and v_proj and the input of down_proj, the
feed-forward module); peft initialises every scale to 1 (the adapter would change nothing), so
the scales are then drawn, seeded, from [0.5, 1.5] before saving. The adapter is saved with
`save_pretrained` (adapter_config.json + adapter_model.safetensors) and three prompts (two
plain, one RAG prompt built as domainrag's `rag::build_messages_from_context` does, through the
model's chat template) are answered greedily, 64 new tokens at most, with the adapter and
with the base model alone (before peft wraps it). Writes the adapter and `reference.json` into --out.

  python benches/peft_reference.py --model data/models/SmolLM2-135M-Instruct-hf --method ia3 \
      --out tests/fixtures/peft/ia3
  (likewise --method prompt --out tests/fixtures/peft/prompt, --method prefix --out .../prefix)
(the peft venv: `bash benches/peft-venv.sh` prints its python)
"""

import argparse
import json
import os

import peft
import torch
import transformers
from peft import IA3Config, PrefixTuningConfig, PromptTuningConfig, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer

# Same text as SYSTEM_PROMPT and build_messages_from_context in src/rag.rs (and benches/peft_peer.py).
SYSTEM_PROMPT = (
    "You answer questions using only the numbered sources you are given. Cite the sources you "
    "use with their numbers in brackets, like [1]. If the sources do not contain the answer, "
    'say "I don\'t know."'
)
CONTEXT = (
    "[1] The Normans were the people who in the 10th and 11th centuries gave their name to "
    "Normandy, a region in France. They were descended from Norse raiders and pirates from "
    "Denmark, Iceland and Norway who, under their leader Rollo, agreed to swear fealty to King "
    "Charles III of West Francia.\n[2] The Norman dynasty had a major political, cultural and "
    "military impact on medieval Europe and even the Near East.\n"
)


def prompts() -> list:
    rag = (f"{CONTEXT}Question: In what country is Normandy located?\n"
           "Answer briefly from the sources and cite them like [1].")
    return [
        [{"role": "user", "content": "What is the capital of France?"}],
        [{"role": "user", "content": "Write a short poem about the sea."}],
        [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": rag}],
    ]


def ia3(model, seed: int):
    config = IA3Config(task_type="CAUSAL_LM", target_modules=["k_proj", "v_proj", "down_proj"],
                       feedforward_modules=["down_proj"])
    model = get_peft_model(model, config)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "ia3_l" in name:
                p.copy_(0.5 + torch.rand(p.shape, generator=g))
    return model


# The text prompt and prefix tuning start from.
INIT_TEXT = "Answer in one short sentence from the numbered sources and cite them."
VIRTUAL_TOKENS = 8


def prompt_tuning(model, model_dir: str, seed: int):
    config = PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=VIRTUAL_TOKENS,
                                prompt_tuning_init="TEXT", prompt_tuning_init_text=INIT_TEXT,
                                tokenizer_name_or_path=model_dir)
    model = get_peft_model(model, config)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        w = model.prompt_encoder["default"].embedding.weight
        w.add_(0.02 * torch.randn(w.shape, generator=g))
    return model


def prefix_tuning(model, tok, seed: int):
    ids = tok(INIT_TEXT, return_tensors="pt")["input_ids"][:, :VIRTUAL_TOKENS]
    with torch.no_grad():
        cache = model(input_ids=ids, use_cache=True).past_key_values
    rows = []
    for layer in range(model.config.num_hidden_layers):
        k, v = cache.layers[layer].keys[0], cache.layers[layer].values[0]  # (kv_heads, n, head_dim)
        # peft's layout: row t holds, per layer, its key then its value, each (kv_heads, head_dim).
        rows += [k.permute(1, 0, 2).reshape(VIRTUAL_TOKENS, -1), v.permute(1, 0, 2).reshape(VIRTUAL_TOKENS, -1)]
    table = torch.cat(rows, dim=1)
    config = PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=VIRTUAL_TOKENS)
    model = get_peft_model(model, config)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        w = model.prompt_encoder["default"].embedding.weight
        assert w.shape == table.shape, (w.shape, table.shape)
        w.copy_(table + 0.02 * torch.randn(table.shape, generator=g))
    return model


def greedy(model, tok, messages, max_new: int) -> dict:
    ids = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                  return_dict=True)["input_ids"]
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                             max_new_tokens=max_new, do_sample=False)
    new = out[0, ids.shape[1]:].tolist()
    eos = model.generation_config.eos_token_id
    eos = set(eos if isinstance(eos, list) else [eos])
    while new and new[-1] in eos:
        new.pop()
    return {"prompt_tokens": ids.shape[1], "tokens": new, "text": tok.decode(new, skip_special_tokens=True)}


def greedy_by_forward(model, tok, messages, max_new: int) -> dict:
    """Greedy tokens through the peft model's forward over the whole sequence at every step (no
    cache), which is what the method defines. peft 0.21.2's generate under transformers 5.24 is
    wrong for both prompt-learning kinds: it drops a prefix-tuning adapter's key/values (handed
    over as `past_key_values`, which generate no longer reads: its scores equal the base's), and
    with prompt tuning its decode steps part from this loop after a few tokens (this loop agrees
    with the base model run on the virtual tokens' embeddings followed by the prompt's, at
    positions 0, 1, ...)."""
    ids = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                  return_dict=True)["input_ids"]
    eos = model.generation_config.eos_token_id
    eos = set(eos if isinstance(eos, list) else [eos])
    seq, new = ids, []
    with torch.no_grad():
        for _ in range(max_new):
            logits = model(input_ids=seq, attention_mask=torch.ones_like(seq)).logits[0, -1]
            token = int(logits.argmax())
            if token in eos:
                break
            new.append(token)
            seq = torch.cat([seq, torch.tensor([[token]])], dim=1)
    return {"prompt_tokens": ids.shape[1], "tokens": new, "text": tok.decode(new, skip_special_tokens=True)}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="the converted HF base model directory")
    p.add_argument("--method", choices=["ia3", "prompt", "prefix"], required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--max-new-tokens", type=int, default=64)
    args = p.parse_args()
    torch.manual_seed(args.seed)
    torch.set_num_threads(2)
    tok = AutoTokenizer.from_pretrained(args.model)
    base = AutoModelForCausalLM.from_pretrained(args.model, torch_dtype=torch.float32)
    base.eval()
    # The base's answers come first, from the model before peft wraps it.
    without = [greedy(base, tok, m, args.max_new_tokens) for m in prompts()]
    if args.method == "ia3":
        model = ia3(base, args.seed)
    elif args.method == "prompt":
        model = prompt_tuning(base, args.model, args.seed)
    else:
        model = prefix_tuning(base, tok, args.seed)
    model.eval()
    os.makedirs(args.out, exist_ok=True)
    model.save_pretrained(args.out)
    cases = []
    decode = greedy if args.method == "ia3" else greedy_by_forward
    for messages, alone in zip(prompts(), without):
        cases.append({"messages": messages, "base": alone,
                      "adapter": decode(model, tok, messages, args.max_new_tokens)})
    reference = {
        "method": args.method,
        "seed": args.seed,
        "max_new_tokens": args.max_new_tokens,
        "decoding": "generate" if args.method == "ia3" else "forward, no cache",
        "versions": {"peft": peft.__version__, "transformers": transformers.__version__,
                     "torch": torch.__version__},
        "cases": cases,
    }
    with open(os.path.join(args.out, "reference.json"), "w") as f:
        json.dump(reference, f, indent=1)
    for c in cases:
        print(json.dumps({"base": c["base"]["text"][:80], "adapter": c["adapter"]["text"][:80]}))


if __name__ == "__main__":
    main()
