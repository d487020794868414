"""The trained tiny presets' data set, training and evaluation (issue 17).

``scenes``: procedural captioned scenes and the depiction checks; ``train``: ``kvpolicy train-tiny``
(tokenizers and teacher-forced next-scale transformers on the adapters' own modules);
``evaluate``: ``python -m adapters.tiny.evaluate`` (depiction rates on held-out conditions, and the
selectivity table of calibration files). Model-specific by nature, so it lives with the adapters,
not in the model-agnostic harness.
"""
