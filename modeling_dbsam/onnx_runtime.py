"""DB-SAM on ONNX Runtime: the exported encoder and prompt decoder behind the predictor's model interface.

``conversion/export_onnx.py`` writes a folder that a viewer or a CPU-only machine can run without PyTorch:

- ``vision_encoder.onnx``: ``pixel_values`` (1, 3, S, S) and, for DB-SAM, ``conv_pixel_values``
  (1, 3, C, C), the convolution branch's own image ``I_conv``; returns ``image_embeddings`` (1, D, g, g);
- ``prompt_decoder.onnx`` (one mask per prompt) and ``prompt_decoder_multimask.onnx`` (SAM's three
  masks for ambiguous prompts): ``image_embeddings`` (1, D, g, g) of one image, ``point_coords``
  (n, k, 2) and ``point_labels`` (n, k); return ``low_res_logits`` (n, m, 4g, 4g) and ``iou_scores`` (n, m);
- ``preprocessing.json``: the image processor's settings, the intensity rule, the sizes and the provenance.

Prompts are tokens, as in SAM's own ONNX decoder: points with label 1 (foreground) or 0 (background),
then a box as its two corners with labels 2 and 3; a prompt without a box ends with one padding point
(label -1). Coordinates are in the resized image the encoder sees (pixels of the ``S`` frame).

:class:`OnnxSamModel` answers the calls that :mod:`modeling_dbsam.predictor` makes on a PyTorch model
(``get_image_embeddings`` and the decoder call on cached embeddings), so the predictor, the pipeline and
volume inference run unchanged on ONNX Runtime, with the same preprocessing and postprocessing code.
``onnxruntime`` is imported only when a session is created.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from types import SimpleNamespace

import numpy as np
import torch

ENCODER_FILE = "vision_encoder.onnx"
DECODER_FILE = "prompt_decoder.onnx"
MULTIMASK_DECODER_FILE = "prompt_decoder_multimask.onnx"
PREPROCESSING_FILE = "preprocessing.json"
FORMAT = "dbsam-onnx"

PAD_LABEL, BOX_TOP_LEFT_LABEL, BOX_BOTTOM_RIGHT_LABEL = -1, 2, 3
PROMPT_LABELS = {
    str(PAD_LABEL): "padding point (a prompt without a box)",
    "0": "background point",
    "1": "foreground point",
    str(BOX_TOP_LEFT_LABEL): "box corner x0, y0",
    str(BOX_BOTTOM_RIGHT_LABEL): "box corner x1, y1",
}


def is_onnx_folder(folder: str | os.PathLike) -> bool:
    """Whether ``folder`` holds an exported ONNX encoder (as opposed to a PyTorch model folder)."""
    return os.path.isfile(os.path.join(folder, ENCODER_FILE))


def prompt_tokens(
    boxes: np.ndarray | None, points: np.ndarray | None, labels: np.ndarray | None
) -> tuple[np.ndarray, np.ndarray]:
    """``point_coords`` (n, k, 2) float32 and ``point_labels`` (n, k) int64 for the decoder graph.

    ``boxes`` (n, 4), ``points`` (n, k, 2) and ``labels`` (n, k) are in the encoder's frame. The token
    order is that of SAM's prompt encoder: points, then the box corners, or a padding point without a box.
    """
    if boxes is None and points is None:
        raise ValueError("no prompt given: pass boxes and/or points")
    count = len(boxes) if boxes is not None else len(points)
    coords, token_labels = [], []
    if points is not None:
        coords.append(np.asarray(points, dtype=np.float32))
        token_labels.append(np.asarray(labels, dtype=np.int64))
    if boxes is not None:
        coords.append(np.asarray(boxes, dtype=np.float32).reshape(count, 2, 2))
        token_labels.append(
            np.tile(np.array([BOX_TOP_LEFT_LABEL, BOX_BOTTOM_RIGHT_LABEL], dtype=np.int64), (count, 1))
        )
    else:
        coords.append(np.zeros((count, 1, 2), dtype=np.float32))
        token_labels.append(np.full((count, 1), PAD_LABEL, dtype=np.int64))
    return np.concatenate(coords, axis=1), np.concatenate(token_labels, axis=1)


@dataclass(frozen=True)
class OnnxModelConfig:
    """What the shared preprocessing asks of a model's config (see :func:`modeling_dbsam.pixels.conv_input_size`)."""

    image_size: int
    use_conv_branch: bool
    conv_input_size: int | None


def read_preprocessing(folder: str | os.PathLike) -> dict:
    """The folder's ``preprocessing.json``, with a clear error when it is missing or not an export's."""
    path = os.path.join(folder, PREPROCESSING_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"{folder}: no {PREPROCESSING_FILE}; the ONNX files cannot be run without the preprocessing they "
            "were exported with: export the model again with conversion/export_onnx.py"
        )
    try:
        with open(path) as file:
            settings = json.load(file)
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: not valid JSON ({error})") from None
    if not isinstance(settings, dict) or settings.get("format") != FORMAT:
        raise ValueError(f'{path}: not a DB-SAM ONNX preprocessing file (no "format": "{FORMAT}")')
    return settings


def processor_from_settings(settings: dict):
    """The ``SamProcessor`` (PIL backend, as :func:`modeling_dbsam.processing.load_processor`) the JSON describes."""
    from transformers import SamProcessor
    from transformers.models.sam.image_processing_pil_sam import SamImageProcessorPil

    return SamProcessor(image_processor=SamImageProcessorPil.from_dict(dict(settings["image_processor"])))


class OnnxSamModel:
    """The exported encoder and prompt decoders on ONNX Runtime, called as the predictor calls a ``SamModel``.

    Load with :meth:`from_folder`. ``threads`` sets ONNX Runtime's intra-op threads (default: its own choice).
    """

    dtype = torch.float32
    device = torch.device("cpu")

    def __init__(self, folder: str | os.PathLike, settings: dict, threads: int | None = None):
        self.folder, self.settings, self.threads = str(folder), settings, threads
        sizes = settings["sizes"]
        self.config = OnnxModelConfig(
            sizes["image_size"], sizes["conv_input_size"] is not None, sizes["conv_input_size"]
        )
        self.encoder = self._session(ENCODER_FILE)
        self._decoders: dict[bool, object] = {}
        self._check_sizes()

    @classmethod
    def from_folder(cls, folder: str | os.PathLike, threads: int | None = None) -> OnnxSamModel:
        if not os.path.isdir(folder):
            raise FileNotFoundError(f"{folder}: no such ONNX model folder")
        settings = read_preprocessing(folder)
        for name in (ENCODER_FILE, DECODER_FILE):
            if not os.path.isfile(os.path.join(folder, name)):
                raise FileNotFoundError(f"{folder}: no {name}; export the model with conversion/export_onnx.py")
        return cls(folder, settings, threads)

    def _session(self, name: str):
        try:
            import onnxruntime
        except ImportError:
            raise ImportError(
                "running an exported model needs onnxruntime: pip install 'dbsam-transformers[onnx]'"
            ) from None
        options = onnxruntime.SessionOptions()
        # The arena keeps the activations' memory from one image to the next: without it every run maps it
        # afresh, about 850 000 page faults (1 s of system time) per ViT-B image at 1024 px, for the same
        # peak (4.2 GB). The memory pattern, planning all activations as one block, would raise it to 7.5 GB.
        options.enable_mem_pattern = False
        # Threads that wait sleep instead of spinning, which would take the CPU from other threads and
        # processes; each operator of the encoder runs for milliseconds, so waking them costs little.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        if self.threads is not None:
            options.intra_op_num_threads = self.threads
            options.inter_op_num_threads = 1
        path = os.path.join(self.folder, name)
        try:
            return onnxruntime.InferenceSession(path, options, providers=["CPUExecutionProvider"])
        except Exception as error:  # ONNX Runtime raises its own exception types for unreadable models
            raise ValueError(f"{path}: ONNX Runtime cannot load it ({error})") from None

    def _check_sizes(self) -> None:
        """The JSON must describe the graph: a mismatch would feed the encoder wrongly sized images."""
        inputs = {node.name: node.shape for node in self.encoder.get_inputs()}
        image_processor = self.settings["image_processor"]
        pad = image_processor.get("pad_size", {})
        expected = {"pixel_values": (pad.get("height"), pad.get("width"))}
        if self.config.conv_input_size is not None or "conv_pixel_values" in inputs:
            expected["conv_pixel_values"] = (self.config.conv_input_size,) * 2
        for name, size in expected.items():
            actual = tuple(inputs.get(name, (None,) * 4)[2:])
            if actual != size:
                raise ValueError(
                    f"{self.folder}: {PREPROCESSING_FILE} does not match {ENCODER_FILE}: the encoder takes {name} of "
                    f"{actual[0]} x {actual[1]} pixels but the JSON gives {size[0]} x {size[1]}"
                    if None not in actual
                    else f"{self.folder}: {PREPROCESSING_FILE} gives {name} of {size[0]} x {size[1]} pixels but "
                    f"{ENCODER_FILE} takes no such input"
                )
        if image_processor.get("size", {}).get("longest_edge") != self.config.image_size:
            raise ValueError(
                f"{self.folder}: {PREPROCESSING_FILE} resizes to {image_processor.get('size')} but the model's image "
                f"size is {self.config.image_size}"
            )

    def decoder(self, multimask_output: bool):
        if multimask_output not in self._decoders:
            name = MULTIMASK_DECODER_FILE if multimask_output else DECODER_FILE
            if not os.path.isfile(os.path.join(self.folder, name)):
                raise FileNotFoundError(f"{self.folder}: no {name}; export the model with conversion/export_onnx.py")
            self._decoders[multimask_output] = self._session(name)
        return self._decoders[multimask_output]

    def get_image_embeddings(
        self, pixel_values: torch.Tensor, conv_pixel_values: torch.Tensor | None = None
    ) -> torch.Tensor:
        """(B, D, g, g) embeddings of normalised pixel values, as ``SamModel.get_image_embeddings``."""
        names = [node.name for node in self.encoder.get_inputs()]
        if "conv_pixel_values" in names and conv_pixel_values is None:
            raise ValueError("this DB-SAM encoder needs conv_pixel_values (I_conv) besides pixel_values")
        if "conv_pixel_values" not in names and conv_pixel_values is not None:
            raise ValueError("conv_pixel_values was given but this model has no convolution branch")
        inputs = {"pixel_values": pixel_values, "conv_pixel_values": conv_pixel_values}
        arrays = {name: np.asarray(inputs[name].detach().cpu(), dtype=np.float32) for name in names}
        embeddings = [  # the graph takes one image per run
            self.encoder.run(None, {name: array[index : index + 1] for name, array in arrays.items()})[0]
            for index in range(len(pixel_values))
        ]
        return torch.from_numpy(np.concatenate(embeddings))

    def __call__(
        self,
        image_embeddings: torch.Tensor,
        multimask_output: bool = True,
        input_boxes: torch.Tensor | None = None,
        input_points: torch.Tensor | None = None,
        input_labels: torch.Tensor | None = None,
    ) -> SimpleNamespace:
        """The mask decoder on one image's cached embedding: ``pred_masks`` (1, n, m, h, w), ``iou_scores`` (1, n, m)."""
        if len(image_embeddings) != 1:
            raise ValueError(f"the ONNX decoder takes the embedding of one image, got {len(image_embeddings)}")
        coords, labels = prompt_tokens(
            None if input_boxes is None else input_boxes[0].cpu().numpy(),
            None if input_points is None else input_points[0].cpu().numpy(),
            None if input_labels is None else input_labels[0].cpu().numpy(),
        )
        feeds = {
            "image_embeddings": np.ascontiguousarray(image_embeddings.cpu().numpy(), dtype=np.float32),
            "point_coords": coords,
            "point_labels": labels,
        }
        logits, scores = self.decoder(multimask_output).run(None, feeds)
        return SimpleNamespace(pred_masks=torch.from_numpy(logits)[None], iou_scores=torch.from_numpy(scores)[None])


def load_onnx_model(folder: str | os.PathLike, threads: int | None = None):
    """The exported model and the processor its ``preprocessing.json`` describes, as ``(model, processor)``."""
    model = OnnxSamModel.from_folder(folder, threads)
    return model, processor_from_settings(model.settings)
