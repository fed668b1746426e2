"""`imageragturbo bench retrieval`: our searcher against the libraries a user would pick instead.

One run, same data and queries for everyone:

1. data: synthetic clustered, L2-normalised embeddings (paper scale: n = 630,000, d = 1024 as
   OpenCLIP ViT-H text features), written once to ``.npy`` files in the work folder, plus the
   exact top-k of every query (blocked matmul) as ground truth;
2. each searcher in its own subprocess (so ``peak_rss_gb`` is that searcher's own peak: data
   loaded + index built + searches), one thread for build and search: build time, index size on
   disk, then for each search-time setting single-query (batch 1) latencies and recall@k; the
   reported operating point is the fastest setting with recall >= the target;
3. the feature-store side: gather time of k SD-sized H-features (1280 x 8 x 8) from memory-mapped
   stores of ``--h-rows`` rows, fp16 and int8 + scales (dequantised as an int8 database serves
   them), page cache cold and warm (a store that does not fit on the disk is skipped, naming
   why), the store size at 0.63M rows, and the effect of shrinking it (int8 per channel, fewer
   channels by PCA) on a model's output, when a model is given.

The peers include ``milvus`` (our MilvusSearcher on Milvus Lite, the ``[milvus]`` extra) and
``milvus-server`` (the same code against the Milvus server ``--milvus-uri`` names).

The modules, by concern: :mod:`.data` (embeddings and ground truth), :mod:`.peers` (how each
searcher is built and searched), :mod:`.worker` (one searcher in its own process),
:mod:`.store` (the feature-store side), :mod:`.run` (the whole run) and :mod:`.report`
(results/retrieval.md).
"""
