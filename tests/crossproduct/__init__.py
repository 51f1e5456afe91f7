"""The cross-product test: variant x base store x layer kind x mode x extras x operation.

Every cell either gives the numbers of a formula computed independently (``formulas.py``,
``reference.py``) or raises a ``LoRAError`` declared in ``refusals.py``; never another
exception, never silently wrong. ``tests/test_cross_product.py`` runs a covering subset (all
pairs of axis values) by default and the full product with ``--cross-product=full``;
``python -m tests.crossproduct --table`` prints the table of cells, ``--docs`` writes
``docs/reference/support-matrix.md``.
"""
