"""The search server: one FastAPI application with the JSON API and the Gradio web UI on one port.

`app.serve.launch` starts it (loopback by default); `app.api` is the JSON API (contract in `app.schemas` and
`app.api_errors`), `app.ui` the Gradio UI, `app.batching` the worker that embeds waiting queries in one forward
pass, `app.live_index` the served index version and its reload without restart, `app.access` the one token check
for every path, `app.metrics` / `app.request_ids` / `app.access_log` what an operator reads. Importing this
package loads neither gradio nor torch; the ONNX serving path never imports torch.
"""
