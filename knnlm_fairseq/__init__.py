"""kNN-LM (Khandelwal et al., ICLR 2020) as a fairseq --user-dir plugin.

Importing the package does nothing heavy: fairseq's --user-dir loader imports tasks/ and models/ itself (they
register the knn_eval task and the architectures), and console scripts import only core/ and what they need.
"""
__version__ = "0.2.0"
