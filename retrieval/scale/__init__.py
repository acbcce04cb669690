"""Beyond one process: resumable bulk embedding into parts, sharded index builds, sharded search.

    parts.py          the embeddings folder (manifest + parts with completion markers), read and verified
    embed_job.py      what to embed (dataset splits or image files), split into parts; the local engine
    ray_engine.py     the same parts embedded by a Ray Data actor pool (optional extra `ray`)
    sharded_build.py  `retrieval index --from-embeddings DIR`: one index, N shards, or shards merged
    shards.py         ShardSet: shard indexes searched in parallel with merged results (used by the Searcher)

Nothing here imports Ray unless the Ray engine is chosen.
"""

ENGINES = ("local", "ray")  # where embedding and shard building run; "local" needs no Ray
