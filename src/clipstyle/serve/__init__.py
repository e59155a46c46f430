"""``clipstyle serve``: a local web app to make, watch, keep and queue stylizations.

- :mod:`clipstyle.serve.jobs`: the job queue. One worker thread owns the
  device and the models (loaded once per server); jobs run first in, first
  out; results, style files and their records live in the server's folder.
  It is the only module here that calls the rest of the library.
- :mod:`clipstyle.serve.app`: the HTTP routes (Starlette), server-sent
  events for progress, and the page in ``static/``, which loads nothing from
  the internet.

It sits on top of the library and beside the CLI: it may import every
library layer, never clipstyle.cli. Starlette and uvicorn come with the optional extra ``clipstyle[web]``.
"""
