"""The official `openai` Python client against dynamollm's router, as a user
runs it: completions, chat, streaming with usage, a tool-call history, a
batched prompt and the model list, through engines that require a key.
Usage: openai_client.py BASE_URL API_KEY. Prints one JSON object of what it
saw; any exception fails the test (exit 1)."""
import json
import sys

import openai

base, key = sys.argv[1], sys.argv[2]
client = openai.OpenAI(base_url=base + "/v1", api_key=key, max_retries=0, timeout=120)
out = {}

models = client.models.list()
out["models"] = [m.id for m in models.data]
model = out["models"][0]

c = client.completions.create(model=model, prompt="Energy of LLM inference:", max_tokens=12)
out["completion"] = {"choices": len(c.choices), "text": c.choices[0].text, "usage": c.usage.completion_tokens}

batch = client.completions.create(model=model, prompt=["first prompt", "a second, longer prompt here"], max_tokens=5)
out["batch_choices"] = sorted(ch.index for ch in batch.choices)

chat = client.chat.completions.create(
    model=model, messages=[{"role": "user", "content": "Say hello."}], max_tokens=8
)
out["chat"] = {"role": chat.choices[0].message.role, "content": chat.choices[0].message.content}

tools = [{"type": "function", "function": {"name": "get_weather", "description": "Weather of a city",
          "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]
history = [
    {"role": "user", "content": "What is the weather in Paris?"},
    {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": "{\"city\": \"Paris\"}"}}]},
    {"role": "tool", "tool_call_id": "call_1", "content": "18 C and sunny"},
]
tool_chat = client.chat.completions.create(model=model, messages=history, tools=tools, max_tokens=8)
out["tool_history"] = {"finish_reason": tool_chat.choices[0].finish_reason, "content": tool_chat.choices[0].message.content}

stream = client.chat.completions.create(
    model=model, messages=[{"role": "user", "content": "Count to twenty."}], max_tokens=20,
    stream=True, stream_options={"include_usage": True},
)
text, usage = "", None
for chunk in stream:
    if chunk.choices and chunk.choices[0].delta.content:
        text += chunk.choices[0].delta.content
    if chunk.usage is not None:
        usage = chunk.usage.completion_tokens
out["stream"] = {"text": text, "usage": usage}

try:
    openai.OpenAI(base_url=base + "/v1", api_key="wrong-key", max_retries=0).models.list()
    out["wrong_key"] = "accepted"
except openai.AuthenticationError as e:
    out["wrong_key"] = e.status_code

print(json.dumps(out))
