"""Model definitions: Wan DiT, toy networks, discriminator heads."""
