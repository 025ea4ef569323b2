"""Integrations with the tools people already evaluate models with (lm-evaluation-harness)."""
