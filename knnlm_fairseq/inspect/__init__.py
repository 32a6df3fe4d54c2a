"""Per-token inspection of a kNN-LM evaluation: what the datastore retrieved for each token and whether it helped.

html.py renders one self-contained static HTML page from a plain dict (the contract is in its docstring). The
layer imports only the standard library and core/: no fairseq, no numpy, so a page renders anywhere.
"""
