"""The ``promptable-mask-generation`` pipeline: box and point prompts on 2D images, any bit depth.

```python
from transformers import pipeline
from modeling_dbsam.pipelines import register_pipelines

register_pipelines()  # done by ``import modeling_dbsam``
seg = pipeline("promptable-mask-generation", model="out/")
res = seg("slice.png", input_boxes=[[40, 60, 120, 150], [10, 10, 50, 50]])
res["masks"].shape, res["scores"].shape  # (2, H, W) bool, (2,)
```

Each image goes through the encoder once, whatever the number of prompts, through
:mod:`modeling_dbsam.predictor`. Images that are not 8-bit (16-bit PNG, DICOM, float arrays)
become uint8 by the intensity rule saved with the processor (:mod:`modeling_dbsam.processing`).
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
from transformers import AutoModelForMaskGeneration, Pipeline, SamProcessor
from transformers.pipelines import PIPELINE_REGISTRY

from modeling_dbsam.io import read_image
from modeling_dbsam.model_folder import call_loader, check_model_folder, is_hub_id
from modeling_dbsam.predictor import Prompts, predict_prompts
from modeling_dbsam.processing import IntensityConfig, get_intensity_config, load_processor, to_model_rgb

TASK = "promptable-mask-generation"

_PIL_MODES_AS_IS = ("L", "RGB", "RGBA", "I;16", "I", "F")


def load_image_array(image) -> np.ndarray:
    """A path (PNG, JPG, DICOM... through :func:`modeling_dbsam.io.read_image`), PIL image or array as an array."""
    if isinstance(image, (str, os.PathLike)):
        medical = read_image(image)
        if medical.is_volume:
            raise ValueError(
                f"{image}: is a volume of shape {medical.array.shape}; segment volumes with "
                "modeling_dbsam.inference.segment_volume or `dbsam segment`"
            )
        return medical.array
    if hasattr(image, "mode") and hasattr(image, "convert"):  # a PIL image
        return np.asarray(image if image.mode in _PIL_MODES_AS_IS else image.convert("RGB"))
    if isinstance(image, np.ndarray):
        return image
    raise TypeError(f"image must be a path, a PIL image or a NumPy array; got {type(image).__name__}")


class PromptableMaskGenerationPipeline(Pipeline):
    """Segment the objects that boxes and/or points point at, one mask per prompt at the image's own size.

    Call with an image and ``input_boxes`` (``[[x0, y0, x1, y1], ...]``, pixel indices, x = column),
    ``input_points`` (``[[[x, y], ...], ...]``: one group of points per prompt) and ``input_labels``
    (1 foreground, 0 background; default all 1). With boxes and points together, box ``i`` and
    point group ``i`` form prompt ``i``. For a list of images, pass one such list per image.

    Returns ``{"masks": bool (n_prompts, H, W), "scores": (n_prompts,)}``; with
    ``multimask_output=True`` (the default for point-only prompts, which are ambiguous)
    ``masks`` is ``(n_prompts, 3, H, W)`` and ``scores`` ``(n_prompts, 3)``.
    ``modality`` and ``intensity_window`` override the intensity rule saved with the processor.
    """

    # The processor is loaded below by ``load_processor``: the saved one, PIL backend, clear error if missing.
    _load_processor = False
    _load_image_processor = False
    _load_feature_extractor = False
    _load_tokenizer = False

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if self.processor is None and self.image_processor is not None:
            self.processor = SamProcessor(image_processor=self.image_processor)
        if self.processor is None:
            source = getattr(self.model, "name_or_path", "")
            if not source:
                raise ValueError(
                    f"{TASK} needs the model's SamProcessor: pass processor=... or save it with the model"
                )
            self.processor = load_processor(source)
            self.image_processor = self.processor.image_processor
        if not hasattr(self.model, "get_image_embeddings"):
            raise TypeError(f"{TASK} needs a SAM-style model; got {type(self.model).__name__}")

    def _sanitize_parameters(self, multimask_output=None, modality=None, intensity_window=None, **unknown):
        if unknown:  # a misspelt prompt would otherwise vanish and leave the image unprompted
            raise TypeError(f"{TASK} got unexpected arguments {sorted(unknown)}")
        preprocess_params = {}
        if modality is not None or intensity_window is not None:
            preprocess_params["intensity"] = IntensityConfig(modality, intensity_window)
        forward_params = {} if multimask_output is None else {"multimask_output": multimask_output}
        return preprocess_params, forward_params, {}

    def __call__(self, image, input_boxes=None, input_points=None, input_labels=None, **kwargs) -> Any:
        prompts = {"input_boxes": input_boxes, "input_points": input_points, "input_labels": input_labels}
        if isinstance(image, (list, tuple)):
            inputs = [{"image": single} for single in image]
            for name, value in prompts.items():
                for entry, per_image in zip(inputs, self._per_image(name, value, len(image))):
                    entry[name] = per_image
        else:
            inputs = {"image": image, **prompts}
        return super().__call__(inputs, **kwargs)

    @staticmethod
    def _per_image(name: str, prompt, count: int) -> list:
        if prompt is None:
            return [None] * count
        if len(prompt) != count:
            raise ValueError(f"{name}: for a list of {count} images, pass a list of {count} prompt lists")
        return list(prompt)

    def preprocess(self, inputs: dict, intensity: IntensityConfig | None = None) -> dict:
        image = to_model_rgb(load_image_array(inputs["image"]), intensity or get_intensity_config(self.processor))
        prompts = Prompts(inputs["input_boxes"], inputs["input_points"], inputs["input_labels"])
        return {"image": image, "prompts": prompts.checked(image.shape[:2])}

    def _forward(self, model_inputs: dict, multimask_output: bool | None = None) -> dict:
        prompts = model_inputs["prompts"]
        multimask = prompts.boxes is None if multimask_output is None else multimask_output
        prediction = predict_prompts(
            self.model, self.processor, [model_inputs["image"]], [prompts], batch_size=1, multimask_output=multimask
        )[0]
        return {"masks": prediction.masks, "scores": prediction.scores, "multimask": multimask}

    def postprocess(self, model_outputs: dict) -> dict:
        if model_outputs["multimask"]:
            return {"masks": model_outputs["masks"], "scores": model_outputs["scores"]}
        return {"masks": model_outputs["masks"][:, 0], "scores": model_outputs["scores"][:, 0]}


def load_pipeline(model: str | os.PathLike, **kwargs) -> PromptableMaskGenerationPipeline:
    """``pipeline("promptable-mask-generation", model=model, **kwargs)`` with the model checked first.

    ``transformers.pipeline`` reports a mistyped folder as an invalid Hub repo id and a damaged one with a
    raw loading error; this raises :class:`~modeling_dbsam.model_folder.ModelFolderError` naming the file.
    """
    from transformers import pipeline

    register_pipelines()
    hub = is_hub_id(model)
    if not hub:
        check_model_folder(model)
    return call_loader(model, hub, pipeline, TASK, model=str(model), **kwargs)


def register_pipelines() -> None:
    """Make ``pipeline("promptable-mask-generation", model=...)`` available; safe to call more than once."""
    registered = PIPELINE_REGISTRY.supported_tasks.get(TASK, {}).get("impl")
    if registered is not PromptableMaskGenerationPipeline:
        PIPELINE_REGISTRY.register_pipeline(
            TASK, pipeline_class=PromptableMaskGenerationPipeline, pt_model=AutoModelForMaskGeneration, type="image"
        )
