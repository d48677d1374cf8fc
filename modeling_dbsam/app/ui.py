"""The Gradio page of ``dbsam app``: components wired to :mod:`modeling_dbsam.app.session`.

Every page event turns an error (unreadable file, box outside the image, ...) into the status line and a
notice, never a stack trace, and leaves the other components as they were. Named endpoints (``api_name``) are the API that
``gradio_client`` (and so a 3D Slicer or napari plugin) calls; docs/app.md lists them.
"""

import functools
import logging
import tempfile

import gradio as gr

from modeling_dbsam.app import session as app
from modeling_dbsam.intensity import CT_WINDOW_PRESETS
from modeling_dbsam.io import path_suffix
from modeling_dbsam.objects import objects_from_json, segment_objects
from modeling_dbsam.processing import get_intensity_config

logger = logging.getLogger(__name__)

USER_ERRORS = (ValueError, FileNotFoundError, FileExistsError)
OBJECT_COLUMNS = ["value", "name", "colour", "voxels", "prompt"]


def error_message(error: Exception) -> str:
    """User errors as they are; anything else as one line (logged in full for the operator)."""
    if isinstance(error, USER_ERRORS):
        return str(error)
    logger.exception("unexpected error", exc_info=error)
    return f"unexpected error ({type(error).__name__}): {error}"


def raises_errors(handler):
    """For API-only endpoints: an error reaches the caller (``gradio_client`` raises it) as one message."""

    @functools.wraps(handler)
    def wrapper(*args, **kwargs):
        try:
            return handler(*args, **kwargs)
        except Exception as error:
            raise gr.Error(error_message(error), print_exception=False) from None

    return wrapper


def reports_errors(outputs: int):
    """For page events whose last output is the status line: an error becomes that line (and a notice),
    and every other output keeps its value, so a mistake never blanks the slice or loses the objects.
    """

    def decorate(handler):
        @functools.wraps(handler)
        def wrapper(*args, **kwargs):
            try:
                return handler(*args, **kwargs)
            except Exception as error:
                message = error_message(error)
                gr.Warning(message)
                return (*[gr.skip()] * (outputs - 1), f"**Error:** {message}")

        return wrapper

    return decorate


def build_app(model, processor, title: str = "DB-SAM: box-prompted medical image segmentation") -> gr.Blocks:
    """The page, serving ``model`` and ``processor`` (loaded once, shared by every visitor)."""
    model_intensity = get_intensity_config(processor)
    exports = tempfile.mkdtemp(prefix="dbsam-app-exports-")

    def view(state: app.Session, z, window):
        return app.render(state, int(z), app.display_intensity(window, model_intensity))

    def described(state: app.Session) -> str:
        scan = state.scan
        kind = f"volume of {scan.depth} slices" if scan.is_volume else "2D image"
        height, width = scan.plane_shape
        return f"**{scan.name}**: {kind}, {width} x {height} pixels. {scan.note}".strip()

    @reports_errors(outputs=8)
    def open_files(files, state: app.Session):
        if not files:
            raise ValueError("no file given: upload a volume, a 2D image, or a zip of a DICOM series")
        paths = [getattr(f, "name", f) for f in (files if isinstance(files, list) else [files])]
        scan = app.open_scan(paths)
        state = app.Session(scan=scan)
        z = scan.depth // 2
        slider = gr.Slider(minimum=0, maximum=max(scan.depth - 1, 1), value=z, step=1, interactive=scan.is_volume)
        image = view(state, z, app.MODEL_WINDOW)
        return state, slider, image, app.MODEL_WINDOW, described(state), [], names(state), "click two corners of a box"

    @reports_errors(outputs=2)
    def show_slice(state: app.Session, z, window):
        if state.scan is None:
            return gr.skip(), ""
        return view(state, z, window), ""

    @reports_errors(outputs=3)
    def on_click(state: app.Session, z, window, event: gr.SelectData):
        message = app.click(state, *event.index[:2])
        return state, view(state, z, window), message

    @reports_errors(outputs=3)
    def set_box(state: app.Session, box: str, z, window):
        try:
            values = [float(v) for v in box.replace(" ", "").split(",")] if box else []
        except ValueError:
            raise ValueError(f"box {box!r}: expected four comma-separated numbers x0,y0,x1,y1") from None
        app.set_box(state, values)
        x0, y0, x1, y1 = state.box
        return state, view(state, z, window), f"box x={x0}..{x1}, y={y0}..{y1}; name the object and press Segment"

    @reports_errors(outputs=2)
    def prepare_embedding(state: app.Session, z, mode):
        """After a box corner: encode the slice now, while the user finishes the box, so Segment only decodes."""
        if state.scan is not None and state.corners and app.uses_slice_embedding(state.scan, mode):
            app.slice_embedding(state, model, processor, model_intensity, int(z))
        return gr.skip(), gr.skip()

    @reports_errors(outputs=5)
    def segment(state: app.Session, name, mode, z, z0, z1, window, progress=gr.Progress(track_tqdm=True)):  # noqa: B008
        z_range = (int(z0 or 0), int(z1 or 0))
        slices = state.scan is not None and not app.uses_slice_embedding(state.scan, mode)  # a progress bar for them
        added = app.segment(state, model, processor, model_intensity, name, mode, int(z), z_range, progress=slices)
        voxels = int(added.mask.sum())
        message = f"segmented {added.name!r}: {voxels} voxels" + ("" if voxels else " (empty mask)")
        return state, view(state, z, window), app.objects_table(state), names(state), message

    @reports_errors(outputs=5)
    def remove(state: app.Session, name, z, window):
        message = app.remove(state, name or None)
        return state, view(state, z, window), app.objects_table(state), names(state), message

    @reports_errors(outputs=5)
    def undo(state: app.Session, z, window):
        message = app.remove(state, None)
        return state, view(state, z, window), app.objects_table(state), names(state), message

    @reports_errors(outputs=5)
    def clear(state: app.Session, z, window):
        state.objects, state.corners = [], []
        return state, view(state, z, window), [], names(state), "cleared all objects"

    @reports_errors(outputs=2)
    def export(state: app.Session, file_format):
        folder = tempfile.mkdtemp(dir=exports)
        label_map, legend = app.export(state, file_format, folder)
        return [label_map, legend], f"label map {path_suffix(label_map)} and legend ready to download"

    def names(state: app.Session):
        choices = [o.name for o in state.objects]
        return gr.Dropdown(choices=choices, value=choices[-1] if choices else None)

    with gr.Blocks(title="DB-SAM") as demo:
        state = gr.State(app.Session())
        gr.Markdown(
            f"## {title}\nOpen a scan, click two opposite corners of a box, name the object, press **Segment**."
        )
        with gr.Row():
            with gr.Column(scale=1, min_width=280):
                files = gr.File(
                    label="Scan: NIfTI, NRRD, MHA, PNG/JPG/DICOM, a zip of a DICOM series, or its files",
                    file_count="multiple",
                    elem_id="scan-upload",
                )
                summary = gr.Markdown(elem_id="scan-summary")
                window = gr.Dropdown([app.MODEL_WINDOW, *CT_WINDOW_PRESETS], value=app.MODEL_WINDOW, label="window")
                slider = gr.Slider(0, 1, value=0, step=1, label="slice (z)", interactive=False, elem_id="slice")
                box_text = gr.Textbox(label="box x0,y0,x1,y1 (or click the image)", elem_id="box-text")
                name = gr.Textbox(label="object name", placeholder="e.g. liver", elem_id="object-name")
                mode = gr.Radio(list(app.MODES), value="slice", label="segment", elem_id="mode")
                with gr.Row():
                    z0 = gr.Number(0, precision=0, label="3D box: from slice", minimum=0, elem_id="z-from")
                    z1 = gr.Number(0, precision=0, label="to slice", minimum=0, elem_id="z-to")
                run = gr.Button("Segment", variant="primary", elem_id="segment")
                with gr.Row():
                    undo_button = gr.Button("Undo last", elem_id="undo")
                    clear_button = gr.Button("Clear all", elem_id="clear")
                with gr.Row():
                    chosen = gr.Dropdown([], label="object", elem_id="object-choice")
                    remove_button = gr.Button("Remove object", elem_id="remove")
            with gr.Column(scale=2):
                image = gr.Image(
                    type="numpy",
                    format="png",
                    interactive=False,
                    show_label=False,
                    elem_id="slice-view",
                    buttons=[],
                )
                status = gr.Markdown(elem_id="status")
                table = gr.Dataframe(headers=OBJECT_COLUMNS, interactive=False, label="objects", elem_id="objects")
                with gr.Row():
                    file_format = gr.Radio(list(app.EXPORT_FORMATS), value=".nii.gz", label="label map format")
                    export_button = gr.Button("Export label map", elem_id="export")
                downloads = gr.File(label="download", file_count="multiple", elem_id="downloads")

        edits = [state, image, table, chosen, status]
        files.upload(
            open_files,
            [files, state],
            [state, slider, image, window, summary, table, chosen, status],
            api_name="open",
        )
        # the user's changes only (.input): opening a scan sets the slider and window and draws the slice itself
        for browse in (slider, window):
            browse.input(
                show_slice, [state, slider, window], [image, status], api_name=False, trigger_mode="always_last"
            )
        on_model = {"concurrency_id": "model", "concurrency_limit": 1}  # one model call at a time, in order
        embed = {"fn": prepare_embedding, "inputs": [state, slider, mode], "outputs": [state, status]}
        image.select(on_click, [state, slider, window], [state, image, status], api_name=False).then(
            **embed, api_name=False, show_progress="hidden", **on_model
        )
        box_text.submit(set_box, [state, box_text, slider, window], [state, image, status], api_name="set_box").then(
            **embed, api_name=False, show_progress="hidden", **on_model
        )
        run.click(  # progress on the status line only: an animation over the slice costs CPU the model needs
            segment,
            [state, name, mode, slider, z0, z1, window],
            edits,
            api_name="segment",
            show_progress_on=[status],
            **on_model,
        )
        undo_button.click(undo, [state, slider, window], edits, api_name="undo")
        remove_button.click(remove, [state, chosen, slider, window], edits, api_name="remove")
        clear_button.click(clear, [state, slider, window], edits, api_name="clear")
        export_button.click(export, [state, file_format], [downloads, status], api_name="export")
        with gr.Row(visible=False):  # the stateless plugin endpoint: components only to carry files in and out
            plugin_scan, plugin_objects = gr.File(), gr.Textbox()
            plugin_format, plugin_result = gr.Textbox(value=".nii.gz"), gr.File(file_count="multiple")
            plugin_run = gr.Button()
        plugin_run.click(
            segment_file(model, processor, model_intensity, exports),
            [plugin_scan, plugin_objects, plugin_format],
            plugin_result,
            api_name="segment_file",
            **on_model,
        )
    return demo


def segment_file(model, processor, model_intensity, exports: str):
    """A stateless endpoint for plugins: a scan and its objects in, the label map and its legend out."""

    @raises_errors
    def segment_file(scan, objects: str, file_format: str) -> list[str]:
        """Segment every object of `objects` (JSON: [{"name", "box", "key_slice"?}, ...]) in `scan`."""
        if not scan:
            raise ValueError("no scan given")
        state = app.Session(scan=app.open_scan([getattr(scan, "name", scan)]))
        prompts = objects_from_json(objects)
        result = segment_objects(
            model, processor, state.scan.array, prompts, is_volume=state.scan.is_volume, intensity=model_intensity
        )
        for value, prompt in enumerate(prompts, start=1):
            mask = result.labels == value
            state.objects.append(app.SegmentedObject(prompt.name, prompt, mask, result.scores[value - 1]))
        return list(app.export(state, file_format or ".nii.gz", tempfile.mkdtemp(dir=exports)))

    return segment_file
