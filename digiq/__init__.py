"""digiq: the Digi-Q offline VLM-critic pipeline (Bai, Zhou, Li, Levine, Kumar; ICLR 2025) as one package."""

__version__ = "0.1.0"
