"""imnm-cds: a CDS Hooks 2.0 service for immune-mediated necrotizing myopathy."""

__version__ = "0.1.0"
