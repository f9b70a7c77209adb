"""The jobs ``launch/train.py`` runs (``job:`` in the experiment config): distill (any method on any
model family, through the DeepSpeed trainer) and toylab_table."""
