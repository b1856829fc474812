"""tome-serve: the HTTP service around the tome library.

One request's path, one file per step:

- ``routes.py``      POST /classify, /visualize, GET /models: admit, read the upload, answer
- ``upload.py``      the request body -> the image's bytes, within the upload limit
- ``service.py``     the one call: (model, r, image bytes, what to return) -> Result
- ``decode.py``      bytes -> an upright RGB image, or a 4xx ImageError
- ``preprocess.py``  image -> the model's uint8 input (its own timm resize and crop)
- ``item.py``        Want, Item (one image through the queue), Result (one image's answer)
- ``batching.py``    one bounded queue per (model, r), forming batches
- ``inference.py``   a formed batch through the patched model; resolves each item
- ``render.py``      merge map -> PNG (called by the inference thread)
- ``errors.py``      every failure as an exception type, and its HTTP answer
- ``middleware.py``  the request id (set once) and the request metrics
- ``metrics.py``     the Prometheus metrics

r=auto (the server chooses each batch's r to hold a latency target), beside that path:

- ``auto_params.py`` ``r=auto|int``, ``target_ms``, ``max_r``: checked, with the 422 messages
- ``auto.py``        per model: admission (429 past the floor), the batch's r, what every batch reports
- ``controller.py``  the decision: the least usable r that keeps queued auto requests on time; hysteresis
- ``costs.py``       the measured cost table (seconds per r and batch size), warm-up and updates
- ``auto_metrics.py`` the r=auto metrics and the cost table as gauges

Fidelity (how closely answers at r match r=0; a floor instead of an r), beside it:

- ``fidelity.py``    the table per model: agreement and cosine with r=0, lower bounds, JSON format
- ``calibration.py`` start-up calibration on a folder of images (TOME_CALIBRATION_DIR)
- ``shadow.py``      shadow runs of live traffic at r=0, while the model is idle
- ``fidelity_metrics.py`` the fidelity gauges and the shadow-run counter

Around it: ``__main__.py`` (the CLI), ``config.py`` (settings), ``app.py`` (wiring and life
cycle), ``loading.py``/``weights.py``/``models.py``/``labels.py``/``hub.py`` (start-up),
``probes.py`` (health, readiness, metrics), ``auth.py`` (API key), ``schemas.py`` (response
bodies), ``demo.py`` and ``static/`` (the demo page).
"""
