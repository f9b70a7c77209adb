"""The jobs ``launch/train.py`` runs (``job:`` in the experiment config): wan, toylab, toylab_table."""
