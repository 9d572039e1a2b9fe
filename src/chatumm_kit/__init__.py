"""chatumm_kit: components, recipes and tools for conversational unified multimodal models (ChatUMM on BAGEL)."""

__version__ = "0.1.0"
