"""mla-retrofit: convert MHA/GQA/MQA Hugging Face LLMs into Multi-head Latent Attention."""

__version__ = "0.1.0"
