"""Test doubles that stay on loopback: the fake OpenAI-compatible upstream and the fake tool
server, shared by the tests, the demo and the benchmarks. Both can be scripted per request and
report what they received (see their module docstrings)."""
