"""The greedy prompts both demo-model serving tests send (tests/test_e2e_serve.py on the CPU,
tests/test_gpu_serving.py on a GPU), so the two compare the same requests."""

PROMPTS = [
    "Hello, my name is",
    "The QUICK kernel interleaves",
    "def fibonacci(n):",
    "Once upon a time, in a land far away,",
]
MAX_TOKENS = 24
