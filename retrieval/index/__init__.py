"""Embeddings in, a searchable index folder out.

    knobs.py          the knobs (nlist, nprobe, pq_m, ...), each declared once: IndexConfig, IndexParams and the flags
    config.py         IndexConfig: the requested index type, knob values and memory budget of a build
    types.py          the index types, each declared once: parameters, FAISS factory, memory, search knob, abilities
    faiss_index.py    FAISS indexes: choose a type, build, add/remove, search, read/write, GPU copy
    meta.py           the folder's metadata (meta.json) as a typed, versioned record
    errors.py         the errors an index build, an index file or a re-ranking it cannot serve raises
    folder.py         the index folder: index (or shards) + item table + metadata, published atomically
    shards.py         ShardSet: shard indexes searched in parallel with merged results (the sharded store)
    filters.py        item attributes and metadata filters run inside FAISS with an ID selector
    neighbours.py     gallery neighbour lists stored with an index (database-side augmentation reads them)
    build.py          embed a dataset or image files and publish a folder; add and remove items
    calibrate.py      measure recall on held-out queries at build time and pick the search setting
    vectors.py        build from precomputed embeddings (.npy)
    sharded_build.py  build one index, N shards, or shards merged from an embeddings folder
    milvus_store.py   the Milvus store: a collection's rows, search, upserts, the build's upload (MilvusUpload)
    milvus_filters.py metadata filters as Milvus boolean expressions, every value an escaped literal
    milvus_folder.py  a Milvus-backed index folder: meta.json (+ stored queries) here, vectors and items in Milvus
    milvus_parts.py   embedding parts uploaded into a collection by parallel Ray tasks
    stores.py         which store a folder keeps its vectors in; opening a folder of either kind

Below retrieval.search (the Searcher calls the filtered search and neighbour lists here; nothing here
imports search), above retrieval.embed and retrieval.data (a build embeds a dataset).
"""
