"""The fairseq-free core: kNN math, datastores on disk, faiss indexes and search, logs and sweeps.

Imports only the standard library, numpy, torch and faiss (plus sacremoses in textprep): console scripts and
tests use it without starting fairseq. The fairseq-facing code (tasks/, models/, plugin/) imports this, never
the reverse.
"""
