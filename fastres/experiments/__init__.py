"""Experiments that reproduce the paper's findings with fastres models (run with ``python -m``).

* :mod:`fastres.experiments.degradation` — the degradation problem (He et al. 2015, Fig. 6) on
  scikit-learn's digits: plain-20/56 vs ResNet-20/56, fused vs eager PyTorch.
"""
