"""Upstream execution: failure reasons, outcome classification, retry decisions, the HTTP client."""
