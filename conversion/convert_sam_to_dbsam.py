"""Convert a SAM, MedSAM or transformers SAM checkpoint into a Hub-ready DB-SAM folder.

    python conversion/convert_sam_to_dbsam.py --checkpoint sam_vit_b_01ec64.pth --output-dir dbsam-vit-base-init
    python conversion/convert_sam_to_dbsam.py --checkpoint medsam_vit_b.pth --output-dir dbsam-from-medsam --adapter-init identity
    python conversion/convert_sam_to_dbsam.py --checkpoint facebook/sam-vit-base --output-dir dbsam-vit-base-init

``--checkpoint`` is a Meta-format ``.pth`` (SAM or MedSAM, architecture read from the tensors), a
transformers SAM folder, or a Hub id (from the local cache, or the network if there is one). The folder
gets ``config.json`` (model_type ``dbsam``), ``model.safetensors`` (sharded above ``--max-shard-size``),
the processor config, ``conversion.json`` (provenance and parity) and ``README.md`` (model card).

Before the folder is published the converter reloads it with the adapters switched off and checks that
it reproduces the source model's mask logits (Meta's own code for ``.pth`` input, ``SamModel`` for
transformers input) within 1e-4; anything worse is an error and nothing is written.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import shutil
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import dbsam_card
import sam_parity
import torch
from transformers import SamConfig, SamModel, SamProcessor
from transformers.models.sam.image_processing_pil_sam import SamImageProcessorPil
from transformers.utils import logging as transformers_logging

import modeling_dbsam
from modeling_dbsam import DBSamConfig, DBSamModel, convert
from modeling_dbsam.io import check_output_path, staging_folder

ADAPTERS_OFF = {"use_channel_attention": False, "use_conv_branch": False, "use_fusion": False}
# Meta's published file names, so that cards can name the Hub model they came from.
KNOWN_RELEASES = {
    "sam_vit_b_01ec64.pth": ("facebook/sam-vit-base", 768),
    "sam_vit_l_0b3195.pth": ("facebook/sam-vit-large", 1024),
    "sam_vit_h_4b8939.pth": ("facebook/sam-vit-huge", 1280),
    "medsam_vit_b.pth": ("wanglab/medsam-vit-base", 768),
}
_ORIGINAL_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt", ".safetensors")


@dataclass
class Source:
    """The source model: its configuration, its weights under transformers' names, its preprocessing
    and its own outputs on the parity input."""

    description: str
    config: SamConfig
    weights: dict[str, torch.Tensor]
    processor: SamProcessor
    reference: sam_parity.SamStages
    reference_name: str
    base_model: str | None
    sha256: str | None = None


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 24), b""):
            digest.update(block)
    return digest.hexdigest()


def known_base_model(path: Path, config: SamConfig) -> str | None:
    """The Hub id of a file named as a Meta or MedSAM release, if its width agrees; else unknown."""
    repo_id, width = KNOWN_RELEASES.get(path.name, (None, None))
    return repo_id if width == config.vision_config.hidden_size else None


def load_meta_source(path: Path, decoder_num_heads: int) -> Source:
    """A Meta-format checkpoint; Meta's ``segment_anything`` code, sharing its tensors, is the reference."""
    original = convert.load_original_state_dict(path)
    config = convert.infer_sam_config(original, decoder_num_heads)
    weights = convert.convert_original_state_dict(original, config)
    reference = sam_parity.meta_stages(original, config, sam_parity.parity_inputs(config))
    processor = convert.build_sam_processor(config, *convert.pixel_statistics(original))
    return Source(
        description=f"Meta-format checkpoint {path.name}",
        config=config,
        weights=weights,
        processor=processor,
        reference=reference,
        reference_name="Meta's segment_anything implementation",
        base_model=known_base_model(path, config),
        sha256=sha256(path),
    )


def _source_processor(name_or_path: str, config: SamConfig) -> SamProcessor:
    """The source's own preprocessing, on the PIL image processor (torchvision is optional)."""
    try:
        image_processor = SamImageProcessorPil.from_pretrained(name_or_path)
    except OSError:
        print(f"note: {name_or_path} has no processor config; using SAM's preprocessing")
        return convert.build_sam_processor(config, *convert.pixel_statistics({}))
    if image_processor.pad_size["height"] != config.vision_config.image_size:
        raise ValueError(
            f"{name_or_path}: processor pads to {image_processor.pad_size['height']} px but the model's image size is "
            f"{config.vision_config.image_size}"
        )
    return SamProcessor(image_processor=image_processor)


def load_transformers_source(name_or_path: str) -> Source:
    """A transformers SAM folder or Hub id; ``SamModel`` is the reference."""
    try:
        config_dict, _ = SamConfig.get_config_dict(name_or_path)
    except OSError as error:
        raise ValueError(
            f"{name_or_path}: not a checkpoint file, not a model folder, and not a Hub id available here "
            f"(offline, a Hub id must already be in the local Hugging Face cache): {error}"
        ) from error
    model_type = config_dict.get("model_type")
    if model_type == DBSamConfig.model_type:
        raise ValueError(
            f"{name_or_path}: already a DB-SAM checkpoint; publish it with conversion/push_to_hub.py instead"
        )
    if model_type != SamConfig.model_type:
        raise ValueError(f"{name_or_path}: model_type is {model_type!r}, expected a SAM checkpoint ('sam')")
    reference_model = SamModel.from_pretrained(name_or_path, dtype=sam_parity.PARITY_DTYPE).eval()
    reference = sam_parity.transformers_stages(reference_model, sam_parity.parity_inputs(reference_model.config))
    del reference_model
    model = SamModel.from_pretrained(name_or_path).eval()
    is_hub_id = not Path(name_or_path).exists()
    return Source(
        description=f"transformers SAM checkpoint {name_or_path}",
        config=model.config,
        weights=dict(model.state_dict()),
        processor=_source_processor(name_or_path, model.config),
        reference=reference,
        reference_name="transformers SamModel",
        base_model=name_or_path if is_hub_id else None,
    )


def load_source(checkpoint: str, decoder_num_heads: int) -> Source:
    path = Path(checkpoint)
    if path.is_file():
        return load_meta_source(path, decoder_num_heads)
    if path.suffix in _ORIGINAL_SUFFIXES and not path.exists():
        raise FileNotFoundError(f"{path}: no such checkpoint file")
    return load_transformers_source(checkpoint)


def dbsam_config(sam_config: SamConfig, adapter_kwargs: dict) -> DBSamConfig:
    """The SAM configuration, unchanged, plus the adapter settings."""
    config_dict = sam_config.to_dict()
    config_dict.pop("model_type", None)
    config_dict.pop("architectures", None)
    return DBSamConfig(**config_dict, **adapter_kwargs)


def adapter_options(args: argparse.Namespace) -> dict:
    """DBSamConfig keyword arguments from the flags; ``--adapter-option`` values are JSON where they parse."""
    options = {"adapter_init": args.adapter_init}
    switches_off = {
        "use_channel_attention": args.no_channel_attention,
        "use_conv_branch": args.no_conv_branch,
        "use_fusion": args.no_fusion or args.no_conv_branch,  # fusion mixes both branches
    }
    options.update({name: False for name, off in switches_off.items() if off})
    for text in args.adapter_option:
        key, separator, value = text.partition("=")
        if not separator or not key:
            raise ValueError(f"--adapter-option {text!r}: expected KEY=VALUE")
        if key not in DBSamConfig.__dataclass_fields__ or key in SamConfig.__dataclass_fields__:
            raise ValueError(f"--adapter-option {key!r}: not a DB-SAM adapter setting of DBSamConfig")
        try:
            options[key] = json.loads(value)
        except json.JSONDecodeError:
            options[key] = value
    return options


@contextmanager
def quiet_transformers():
    """Silence the load report: for a SAM -> DB-SAM load it lists the adapter weights, which are meant to be new."""
    verbosity = transformers_logging.get_verbosity()
    transformers_logging.set_verbosity_error()
    try:
        yield
    finally:
        transformers_logging.set_verbosity(verbosity)


def build_dbsam(config: DBSamConfig, weights: dict[str, torch.Tensor]) -> DBSamModel:
    """DB-SAM holding the source's tensors themselves (no copy); only the adapters are new."""
    with quiet_transformers():
        model, info = DBSamModel.from_pretrained(None, config=config, state_dict=weights, output_loading_info=True)
    missing_sam = sorted(set(info["missing_keys"]) & set(weights))
    if missing_sam or info["unexpected_keys"] or info["mismatched_keys"]:
        raise ValueError(
            f"SAM weights do not fit DBSamModel: missing {missing_sam}, unexpected "
            f"{sorted(info['unexpected_keys'])}, mismatched {sorted(info['mismatched_keys'])}"
        )
    print(f"{len(info['missing_keys'])} adapter tensors newly initialised (adapter_init={config.adapter_init!r})")
    return model.eval()


def _load(folder: Path, dtype: torch.dtype | None = None, **config_overrides) -> tuple[DBSamModel, dict]:
    with quiet_transformers():
        model, info = DBSamModel.from_pretrained(folder, dtype=dtype, output_loading_info=True, **config_overrides)
    return model.eval(), info


def check_parity(folder: Path, source: Source) -> dict:
    """Reload the written folder with adapters off and compare with the source; error above tolerance."""
    model, info = _load(folder, sam_parity.PARITY_DTYPE, **ADAPTERS_OFF)
    if info["missing_keys"]:
        raise ValueError(f"the written checkpoint lacks weights: {sorted(info['missing_keys'])}")
    inputs = sam_parity.parity_inputs(source.config)
    outputs = sam_parity.transformers_stages(model, inputs, decode_prompts=source.reference.prompts)
    del model
    result = sam_parity.compare(source.reference, outputs)
    print(f"parity, adapters off, float64, {result.describe(source.reference_name)}")
    if not result.passed:
        raise ValueError(
            f"converted model does not reproduce {source.description}: {result.describe(source.reference_name)}"
        )
    return {"reference": source.reference_name, "tolerance": sam_parity.PARITY_TOLERANCE, **vars(result)}


def check_identity_start(folder: Path, config: DBSamConfig) -> dict:
    """How far identity-initialised adapters move the outputs: adapters on against off, same weights and dtype."""
    inputs = sam_parity.parity_inputs(config)
    outputs = {}
    for name, overrides in (("off", ADAPTERS_OFF), ("on", {})):
        model, _ = _load(folder, **overrides)
        outputs[name] = sam_parity.transformers_stages(model, inputs)
        del model
    result = sam_parity.compare(outputs["off"], outputs["on"])
    print(f"identity init, adapters on {result.describe('adapters off')}")
    return vars(result)


def conversion_record(checkpoint: str, source: Source, decoder_num_heads: int, parity: dict) -> dict:
    """Provenance kept with the weights; a local source is named without its folder, which is nobody else's."""
    path = Path(checkpoint)
    return {
        "source": path.name if path.exists() else checkpoint,
        "source_description": source.description,
        "source_sha256": source.sha256,
        "base_model": source.base_model,
        "decoder_num_heads": decoder_num_heads,
        "parity": parity,
        "converter": f"dbsam-transformers {modeling_dbsam.__version__}",
    }


def publish(staging: Path, output_dir: Path) -> None:
    """Move the finished folder into place; an old one (only with --overwrite) goes last."""
    previous = None
    if output_dir.exists():
        previous = staging_folder(output_dir, "old")
        os.replace(output_dir, previous / output_dir.name)
    os.replace(staging, output_dir)
    if previous is not None:
        shutil.rmtree(previous)


def convert_checkpoint(args: argparse.Namespace) -> Path:
    output_dir = check_output_path(Path(args.output_dir), args.overwrite, inputs=(args.checkpoint,), folder=True)
    adapter_kwargs = adapter_options(args)
    source = load_source(args.checkpoint, args.decoder_num_heads)
    print(f"loaded {source.description}")
    config = dbsam_config(source.config, adapter_kwargs)
    model = build_dbsam(config, source.weights)
    source.weights = {}  # the model now holds the only reference to the tensors
    staging = staging_folder(output_dir)  # also removes what a killed conversion left
    try:
        model.save_pretrained(staging, max_shard_size=args.max_shard_size)
        source.processor.save_pretrained(staging)
        facts = dbsam_card.model_facts(model, source.processor, dbsam_card.processor_file(staging))
        del model
        parity = check_parity(staging, source)
        if config.adapter_init == "identity":
            parity["adapters_on"] = check_identity_start(staging, config)
        record = conversion_record(args.checkpoint, source, args.decoder_num_heads, parity)
        (staging / dbsam_card.CONVERSION_FILE).write_text(json.dumps(record, indent=2) + "\n")
        dbsam_card.converted_card(output_dir.name, output_dir.name, facts, record).save(staging / "README.md")
        publish(staging, output_dir)
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    return output_dir


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="Meta-format .pth, transformers SAM folder, or Hub id")
    parser.add_argument("--output-dir", required=True, help="folder to create")
    parser.add_argument("--overwrite", action="store_true", help="replace --output-dir if it exists")
    parser.add_argument(
        "--adapter-init",
        choices=["paper", "identity"],
        default="paper",
        help="'identity' starts the adapters at the source model's outputs (for fine-tuning from MedSAM)",
    )
    parser.add_argument("--no-channel-attention", action="store_true", help="build without channel attention blocks")
    parser.add_argument(
        "--no-conv-branch", action="store_true", help="build without convolution branch (implies --no-fusion)"
    )
    parser.add_argument("--no-fusion", action="store_true", help="build without the ViT-convolution fusion block")
    parser.add_argument(
        "--adapter-option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="any other DBSamConfig adapter field, e.g. bca_ffn_ratio=4 or stage_end_indexes=[2,5,8,11]",
    )
    parser.add_argument(
        "--decoder-num-heads",
        type=int,
        default=convert.SAM_DECODER_NUM_HEADS,
        help="mask decoder heads of a .pth checkpoint: not stored in its tensors (8 in every SAM/MedSAM release)",
    )
    parser.add_argument("--max-shard-size", default="5GB", help="largest safetensors shard (default 5GB)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        output_dir = convert_checkpoint(args)
    except (ValueError, FileNotFoundError, FileExistsError) as error:
        print(f"convert_sam_to_dbsam: error: {error}", file=sys.stderr)
        return 2
    files = ", ".join(sorted(path.name for path in output_dir.iterdir()))
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"wrote {output_dir}: {files}")
    print(f"peak memory (RSS): {peak_mib:.0f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
