"""The web UI: search a FAISS gallery index by photo and read its Recall@K, served with Gradio.

`app.ui.build_app(searcher)` builds the Gradio Blocks; `app.serve` launches it with safe defaults
(loopback only, bounded queue, only gallery thumbnails served). Importing this package loads
neither gradio nor torch; the ONNX serving path never imports torch.
"""
