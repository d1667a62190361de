"""Embedding computation: the local sentence-transformers encoder and vector validation."""
