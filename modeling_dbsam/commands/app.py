"""``dbsam app``: serve the segmentation page (Gradio) on this machine, or as a Hugging Face Space.

The model folder, device and port are checked before anything heavy is imported or loaded.
"""

from __future__ import annotations

import argparse
import os

NAME = "app"
HELP = "Segment scans in a browser: draw boxes, name objects, download label maps (needs the [app] extra)."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model", help="folder of a saved DB-SAM (or SAM) model with its processor (default: shipped)"
    )
    parser.add_argument("--device", default="cpu", help="torch device, e.g. cpu, cuda, cuda:1 (default: cpu)")
    parser.add_argument(
        "--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1; 0.0.0.0 for all)"
    )
    parser.add_argument("--port", type=int, default=7860, help="port (default: 7860; 0 picks a free one)")
    parser.add_argument("--share", action="store_true", help="also open a temporary public gradio.live link")


def model_folder(given: str | None) -> str:
    """``--model``, or the shipped demonstration model, announced as ``dbsam segment`` announces it."""
    from modeling_dbsam.commands.segment import default_model

    return given if given is not None else default_model()


def free_port(host: str) -> int:
    import socket

    with socket.socket() as probe:
        probe.bind((host, 0))
        return probe.getsockname()[1]


def build(model: str | None, device: str):
    """Check the arguments, load the model once and return the Gradio page (used by the Space's app.py too)."""
    from modeling_dbsam.commands.segment import check_device, check_model_folder, load_model_and_processor

    folder = model_folder(model)
    check_model_folder(folder)
    check_device(device)
    try:
        from modeling_dbsam.app.ui import build_app
    except ImportError as error:
        raise ValueError(f'the app needs gradio ({error}); pip install "dbsam-transformers[app]"') from None
    model, processor = load_model_and_processor(folder, device)
    return build_app(model, processor)


def run(args: argparse.Namespace) -> int:
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    if not 0 <= args.port < 65536:
        raise ValueError(f"--port must be 0..65535, got {args.port}")
    demo = build(args.model, args.device)
    port = args.port or free_port(args.host)
    demo.queue().launch(server_name=args.host, server_port=port, share=args.share, show_error=True)
    return 0
