"""Images in, L2-normalised embeddings out: whatever runs the network, wherever it runs.

    spec.py           EmbedderSpec (torch checkpoint | ONNX file | untrained) and the one opener
    backend.py        the EmbeddingBackend interface every consumer talks to
    torch_backend.py  a checkpoint or an in-memory Embedder, run by torch
    onnx_backend.py   an exported model.onnx, run by onnxruntime (never imports torch)
    bad_images.py     embed a gallery, skipping and listing undecodable files
    parts.py          the embeddings folder (manifest + parts with completion markers)
    job.py            bulk embedding into parts: what to embed, the plan, one part's work; the local engine
    ray_engine.py     the same parts embedded by a Ray Data actor pool (optional extra `ray`)
    engines.py        `embed_to_parts`: a job run on the chosen engine (the dispatcher above job and ray_engine)

The preprocessing every backend applies (and every checkpoint records) is `retrieval.preprocess`,
below both this package and retrieval.data, which shares it with the training transforms.

Kept import-light: importing this package imports neither torch nor onnxruntime nor Ray.
"""

ENGINES = ("local", "ray")  # where bulk embedding and shard building run; "local" needs no Ray
