#!/usr/bin/env python
"""Thin wrapper for running knnlm-build-index from a checkout without installing."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from knnlm_fairseq.cli.build_index import main  # noqa: E402

sys.exit(main())
