"""Integrations of nequip-deq models with simulation codes."""
