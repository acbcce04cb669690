"""Queries in, ranked gallery items out.

    searcher.py  Searcher: open an index folder and its embedder, search images or embeddings, evaluate
    rerank.py    query expansion, database-side augmentation, k-reciprocal re-ranking

What runs inside the index store lives in retrieval.index: the metadata filters (index/filters.py)
and the gallery neighbour lists DBA reads (index/neighbours.py).
"""
