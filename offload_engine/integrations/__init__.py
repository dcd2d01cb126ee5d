"""Integrations of tbrun's selection with other inference engines (optional extras)."""
