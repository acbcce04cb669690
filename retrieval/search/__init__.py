"""Queries in, ranked gallery items out.

    searcher.py  Searcher: open an index folder and its embedder, search images or embeddings, evaluate
    filters.py   attribute filters run inside FAISS with an ID selector
    rerank.py    query expansion, database-side augmentation, k-reciprocal re-ranking
"""
