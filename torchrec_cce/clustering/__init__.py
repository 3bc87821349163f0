"""Re-clustering for CCE tables: Lloyd's k-means whose cross-rank traffic goes through one
small all-reduce hook (:mod:`torchrec_cce.clustering.kmeans`), and the re-clustering step and
schedule built on it."""
