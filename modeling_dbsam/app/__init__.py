"""``dbsam app``: a Gradio page to segment scans in a browser (``pip install "dbsam-transformers[app]"``).

:mod:`modeling_dbsam.app.session` holds what the app does; :mod:`modeling_dbsam.app.ui` the page.
"""
