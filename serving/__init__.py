"""serving: the prediction and monitoring service (FastAPI), planned in its own issue.

It will import torch and the exported twin file only, never hybrid_twin or training.
"""
