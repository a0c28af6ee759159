"""`xpack serve`: one artifact behind an OpenAI-compatible local HTTP API (issue #13).

The runtime side of xpack (no torch): ``pip install 'xpack[serve]'`` with ``xpack[llama]`` or ``xpack[onnx]``.

  config.py    ServeConfig: the server's settings and limits, one frozen dataclass (the CLI's flags fill it)
  requests.py  OpenAI request bodies -> a Job (prompt or messages, settings, image), and ApiError: OpenAI's error JSON
  images.py    an image part (a data: URI, or a file under --media-dir) checked and decoded within the limits
  engine.py    the one loaded model: a bounded queue, generation in a worker thread, a client gone = generation ended
  metrics.py   Prometheus counters and histograms (prometheus_client)
  app.py       the Starlette routes: /v1/chat/completions, /v1/completions, /v1/models, /health, /metrics
"""
