"""vlgate's command line (``vlgate``): upload folders of images as batches, follow them, resume where it stopped.

The client commands talk to the server over HTTP only and import nothing from ``common/``, ``web/`` or
``worker/`` until a server-side command (``serve``, ``worker``, ``keys``) runs, so they need only ``click``,
``requests`` and ``tqdm``.
"""
