"""Cannonade: event-sourced engine for large volumes of LLM requests."""

__version__ = "0.1.0"
