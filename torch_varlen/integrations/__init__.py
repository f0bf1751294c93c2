"""Integrations with other libraries, imported on demand (each needs its library installed).

``torch_varlen.integrations.transformers``: Hugging Face transformers — registers
``attn_implementation="varlen"`` on import, and ``apply_unpadding(model)`` runs BERT-family
encoders on packed tokens end to end.
"""
