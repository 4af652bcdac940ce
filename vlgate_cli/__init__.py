"""vlgate's command-line client: upload folders of images as batches, follow them, resume where it stopped.

It talks to the server over HTTP only and imports nothing from ``common/``, ``web/`` or ``worker/``, so it
runs on any machine with ``click``, ``requests`` and ``tqdm``.
"""
