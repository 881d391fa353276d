"""Data: text corpora -> token shards (`prepare_dataset`) -> packed batches (`PackedLoader`).

Names are imported on first use so that tokenizer worker processes never import torch.
"""
from __future__ import annotations

__all__ = ["PackedLoader", "prepare_dataset", "check_tokenizer_matches", "default_corpus", "iter_documents",
           "iter_pieces", "split_text", "expand_paths"]


def __getattr__(name: str):
    if name == "PackedLoader":
        from velocis.data.loader import PackedLoader

        return PackedLoader
    if name == "check_tokenizer_matches":
        from velocis.tokenizer import check_tokenizer_matches

        return check_tokenizer_matches
    if name == "prepare_dataset":
        from velocis.data import prepare

        return getattr(prepare, name)
    if name in ("iter_documents", "iter_pieces", "split_text", "expand_paths"):
        from velocis.data import sources

        return getattr(sources, name)
    if name == "default_corpus":
        import importlib

        return importlib.import_module("velocis.data.default_corpus")
    raise AttributeError(f"module 'velocis.data' has no attribute {name!r}")
