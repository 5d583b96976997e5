"""Pos2Distill: measure and remove position bias in retrieval-augmented LLMs.

The library holds the pieces shared by the top-level stage scripts:
records and file formats, prompts, metrics, generation backends and
position evaluation. Training lives in the top-level ``kd`` package.
"""

__version__ = "0.1.0"
