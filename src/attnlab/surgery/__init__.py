"""Editing trained models: contextual embeddings, head ablation and roles, attention surgery."""
