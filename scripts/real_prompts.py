"""Prompts for the real-model checks on the GPU (real_model_gpu.py, numerics_gpu.py):
plain text, code, chats with and without a system message, several scripts and number
patterns; `ids_of` tokenizes them as transformers does (chats through the model's
template with the assistant's turn opened)."""

PROMPTS = [
    {"text": "The capital of France is"},
    {"text": "def fibonacci(n):\n    "},
    {"chat": [{"role": "user", "content": "What is the capital of France?"}]},
    {"chat": [{"role": "user", "content": "Write a haiku about the sea."}]},
    {"text": "Once upon a time, in a small village by the mountains,"},
    {"chat": [{"role": "user", "content": "Explain what a GPU is in one sentence."}]},
    {"text": "Café, naïve, 東京, Москва:"},
    {"text": "1, 2, 3, 5, 8, 13,"},
    {"chat": [{"role": "system", "content": "You are a pirate."}, {"role": "user", "content": "How are you today?"}]},
    {"text": "The quick brown fox"},
    {"text": "import numpy as np\n\ndef softmax(x):\n    "},
    {"chat": [{"role": "user", "content": "List three prime numbers greater than 50."}]},
    {"text": "Photosynthesis is the process by which plants"},
    {"chat": [{"role": "user", "content": "Translate 'good morning' into Spanish and German."}]},
    {"text": "SELECT name, COUNT(*) FROM orders GROUP BY"},
    {"chat": [{"role": "system", "content": "Answer in one word."}, {"role": "user", "content": "What color is the sky on a clear day?"}]},
    {"text": "In 1969, the first humans landed on"},
    {"text": "<html>\n  <head>\n    <title>"},
    {"chat": [{"role": "user", "content": "Give me a recipe for pancakes."}]},
    {"text": "Dear hiring manager, I am writing to apply for"},
    {"text": "The derivative of x^2 + 3x with respect to x is"},
    {"chat": [{"role": "user", "content": "Why do cats purr?"}]},
    {"text": "Monday, Tuesday, Wednesday,"},
    {"text": "Der schnelle braune Fuchs springt über"},
]


def ids_of(tok, p):
    if "chat" in p:
        r = tok.apply_chat_template(p["chat"], add_generation_prompt=True, tokenize=True)
        return list(r["input_ids"] if isinstance(r, dict) or hasattr(r, "keys") else r)
    return tok(p["text"], add_special_tokens=False)["input_ids"]


def lead(x, y):
    """How many leading items of x and y are equal."""
    n = 0
    for s, t in zip(x, y):
        if s != t:
            break
        n += 1
    return n
