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

Around it: ``__main__.py`` (the CLI), ``config.py`` (settings), ``app.py`` (wiring and life
cycle), ``loading.py``/``weights.py``/``models.py``/``labels.py``/``hub.py`` (start-up),
``probes.py`` (health, readiness, metrics), ``auth.py`` (API key), ``schemas.py`` (response
bodies), ``demo.py`` and ``static/`` (the demo page).
"""
