"""The ``service`` backend: a remote embedding service over HTTP (the seed-004 API or an OpenAI-compatible
``/v1/embeddings``). ``settings`` says how to reach it, ``protocols`` how to talk to it, ``client`` how to
encode a block of chunks with its limits, its errors and its model identity."""
