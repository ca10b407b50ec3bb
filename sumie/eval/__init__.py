"""Evaluation of generated images (prompt adherence on the synthetic domain)."""
