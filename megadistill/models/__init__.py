"""Model families (one folder each, registry.py) and the discriminator heads they share."""
