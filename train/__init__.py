"""``moebits train``: the project's own trained MoE (corpus, training, model card, measured quality)."""
