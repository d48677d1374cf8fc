"""Hugging Face Space entry file for ``dbsam app`` (Space SDK: gradio, ``app_file: app.py``).

The Space holds this file as ``app.py``, ``requirements.txt`` from this folder, and the package folder
``modeling_dbsam/`` of the repository. Settings (Space variables):

- ``DBSAM_MODEL``: a model folder in the Space, or a Hub model id (downloaded at start);
  unset: the project's default model;
- ``DBSAM_DEVICE``: ``cpu`` (default) or ``cuda`` on GPU hardware.
"""

import os

from modeling_dbsam.commands.app import build


def model_location(given: str | None) -> str | None:
    """A local folder as it is; a Hub model id downloaded to the Space's cache."""
    if given is None or os.path.isdir(given):
        return given
    from huggingface_hub import snapshot_download

    return snapshot_download(given)


os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
demo = build(model_location(os.environ.get("DBSAM_MODEL")), os.environ.get("DBSAM_DEVICE", "cpu"))

if __name__ == "__main__":
    demo.queue().launch()
