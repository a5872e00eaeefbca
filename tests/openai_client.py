"""Drive domainrag's OpenAI-compatible endpoint with the real `openai` client (from PyPI).

Usage: python openai_client.py BASE_URL COLLECTION API_KEY
Prints `1 passed, 0 failed` on success; exits non-zero with the reason otherwise.
"""
import sys

from openai import OpenAI

base, collection, key = sys.argv[1], sys.argv[2], sys.argv[3]
client = OpenAI(base_url=f"{base}/v1", api_key=key, max_retries=0, timeout=120)

models = [m.id for m in client.models.list().data]
assert collection in models, models
assert f"{collection}:base" in models, models

reply = client.chat.completions.create(
    model=collection,
    messages=[{"role": "user", "content": "How do I reset my password?"}],
)
text = reply.choices[0].message.content
assert text, reply
assert reply.usage.completion_tokens > 0, reply.usage
extra = reply.model_extra or {}
assert "citations" in extra, extra

chunks = client.chat.completions.create(
    model=f"{collection}:base",
    messages=[
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "How long does shipping take?"},
        {"role": "assistant", "content": "Two business days to ship."},
        {"role": "user", "content": "And delivery?"},
    ],
    stream=True,
)
streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
assert streamed.strip(), "empty streamed answer"

try:
    client.chat.completions.create(model="no-such-collection", messages=[{"role": "user", "content": "x"}])
    raise AssertionError("unknown collection accepted")
except Exception as e:  # openai.NotFoundError
    assert getattr(e, "status_code", None) == 404, e

print("1 passed, 0 failed")
