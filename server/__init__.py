"""tome-serve: the HTTP service around the tome library.

A request is admitted, decoded, queued by (model, r, merge rule), batched, run through the patched
model, answered and measured. One file per step:

- ``routes.py``      POST /classify, /visualize, /v1/embeddings, GET /models: the service call, the answer
- ``upload.py``      the request body -> the images' bytes, within the limits (data URIs, URLs, files)
- ``service.py``     the request path, one call (``InferenceService.infer_all``): admit, check room,
  read, decode, queue, await; and the served models' life cycle
- ``params.py``      a request's parameters (r or auto, target, auto ceiling, top_k, merge rule) and
  the words for r, checked in one place
- ``lane.py``        one served model, one object: its worker, queues, batch plans and r=auto
- ``images.py``      bytes -> an upright RGB image -> the model's uint8 input (its own resize and crop)
- ``item.py``        Want, Item (one image through the queue), Result (one image's answer)
- ``batching.py``    one bounded queue per (model, r, merge rule), forming batches
- ``inference.py``   a formed batch through the patched model; logits, embeddings, merge maps
- ``pooling.py``     embeddings from the final features: model, cls, mean, patch
- ``errors.py``      every failure as an exception type, and its HTTP answer
- ``middleware.py``  the request id (set once), the request metrics and the API key
- ``metrics.py``     the Prometheus metrics
- ``auto/``          r=auto: the server picks each batch's r to hold a latency target, and for requests
  that name no merge rule the rule with it (the best measured fidelity in the same time)

Around it: ``__main__.py`` (the CLI and its exit codes), ``config.py`` (settings), ``app.py``
(wiring and life cycle), ``loading.py`` (start-up: each model created, weighted, patched and
described), ``threads.py`` (the thread plan), ``probes.py`` (health, readiness, metrics),
``schemas.py`` (request and response bodies), ``docs.py`` (the API docs, served offline),
``demo.py`` and ``static/`` (the demo page). Weights, the hub probe, the CPU's facts and the
fidelity table live in ``tome_runtime`` (``runtime/``), which tome-eval and tome-bench share without
the web stack.

Fidelity (how closely answers at r match r=0; a floor instead of an r), beside it; the table itself,
its bounds and its file format are ``tome_runtime.fidelity``, shared with tome-eval:

- ``calibration.py`` start-up calibration on a folder of images (TOME_CALIBRATION_DIR)
- ``shadow.py``      shadow runs of live traffic at r=0, while the model is idle
- ``fidelity_metrics.py`` the fidelity gauges and the shadow-run counter
"""
