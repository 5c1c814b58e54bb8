"""ReBrain: retrieval-augmented Brownian-bridge diffusion, sparse head CT -> dense brain MRI."""

__version__ = "0.7.0"
