"""The Python API: ``open_kit`` and ``Kit`` (``kit.py``), ``KitFile`` (``file.py``), ``kitfs://``
URLs for fsspec (``fs.py``), the options both take (``options.py``), the background trio loop
they all call into and the Python error boundary (``runtime.py``), and a kit's notebook view
(``html.py``). ``kitfs.open_kit``, ``kitfs.Kit`` and ``kitfs.KitFile`` are the documented
names."""
