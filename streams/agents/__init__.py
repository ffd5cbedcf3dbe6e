"""Faust agents, one module per worker role: commands, gate, executor."""
