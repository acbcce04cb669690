"""metrix-retrieval: image retrieval with embedders trained by Metrix.

Kept import-light on purpose: the ONNX serving path must run without torch, so nothing here
imports torch, torchvision, faiss or gradio.
"""

__version__ = "0.1.0"
