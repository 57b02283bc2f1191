"""Move WAN 2.1 weights between dfm and diffusers' directory layout.

Usage::

    python -m dfm.app.convert import --from DIFFUSERS_DIR --out wan.safetensors
    python -m dfm.app.convert export --from wan.safetensors --out DIFFUSERS_DIR
    python -m dfm.app.convert export --checkpoint RUN_DIR --out DIFFUSERS_DIR [--no-ema] [--dtype bf16]
    torchrun --nproc-per-node N -m dfm.app.convert export --checkpoint RUN_DIR --out DIFFUSERS_DIR
    python -m dfm.app.convert export-lora --checkpoint LORA_RUN_DIR --out adapter.safetensors [--no-ema]
    python -m dfm.app.convert merge-lora --base DIFFUSERS_DIR --lora adapter.safetensors[:SCALE] --out DIFFUSERS_DIR

A LoRA run's checkpoints hold its adapters alone: ``export-lora`` writes them as a diffusers-format LoRA file
(``WanPipeline.load_lora_weights`` loads it); ``merge-lora`` folds adapter files into a diffusers directory's
weights; ``export --checkpoint LORA_RUN_DIR`` writes the run's base with its adapters folded in.

A *dfm weights file* is one safetensors file of the network's state dict (diffusers parameter names)
whose metadata holds the model spec as JSON (key ``dfm.spec``), so it is self-describing. A *diffusers
directory* is what ``WanTransformer3DModel.save_pretrained`` writes and ``from_pretrained`` reads.
Exported from a training checkpoint (:func:`dfm.app.services.checkpoints.export_checkpoint`) it also
holds the training config as ``dfm_config.yaml``, so ``python -m dfm.app.generate --checkpoint DIR``
samples from it; under ``torchrun`` each rank restores and writes only its shards.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

import attrs
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from dfm.app.bootstrap import load_wan_diffusers, save_wan_diffusers
from dfm.app.services.checkpoints import build_wan, check_wan_state, export_checkpoint
from dfm.app.services.lora import LoraFile, export_lora, merge_lora
from dfm.domain.networks.attention import AttentionKernel
from dfm.domain.networks.wan import WanTransformer
from dfm.domain.specs import WanSpec

SPEC_KEY = "dfm.spec"
"""Metadata key of a dfm weights file that holds the spec as JSON."""

DTYPES: dict[str, torch.dtype | None] = {
    "keep": None,
    "fp32": torch.float32,
    "float32": torch.float32,
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "float16": torch.float16,
}
"""``--dtype`` choices: floating tensors are cast to this dtype (``keep``: as stored; checkpoints hold float32)."""

SIZE_UNITS: dict[str, int] = {
    "": 1,
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}
"""``--max-shard-size`` units, as diffusers' ``save_pretrained(max_shard_size=...)`` reads them."""

__all__ = [
    "DTYPES",
    "build_wan",
    "cast_floating",
    "check_wan_state",
    "export_checkpoint",
    "export_wan",
    "import_wan",
    "load_weights_file",
    "parse_size",
    "save_weights_file",
]


# Python API ------------------------------------------------------------------------------------


def export_wan(
    model: WanTransformer,
    spec: WanSpec,
    out_dir: Path | str,
    *,
    dtype: torch.dtype | None = None,
    max_shard_bytes: int | None = None,
    overwrite: bool = False,
) -> Path:
    """Write ``model`` as a diffusers ``WanTransformer3DModel`` directory.

    Args:
        model: The network (its state dict carries diffusers' parameter names).
        spec: Its architecture; must equal ``model.spec``.
        out_dir: Target directory.
        dtype: Cast floating weights to this dtype (default: as they are).
        max_shard_bytes: Shard the weights (with an index file) above this size.
        overwrite: Replace WAN files already in ``out_dir``.

    Returns:
        ``out_dir``.
    """
    if model.spec != spec:
        raise ValueError(f"spec {spec} does not describe the model, which was built from {model.spec}")
    state = cast_floating(model.state_dict(), dtype)
    return save_wan_diffusers(state, spec, out_dir, max_shard_bytes=max_shard_bytes, overwrite=overwrite)


def import_wan(
    model_dir: Path | str, *, dtype: torch.dtype | None = None, attention: AttentionKernel | None = None
) -> WanTransformer:
    """Build a :class:`WanTransformer` from a diffusers directory, loading its weights strictly.

    Args:
        model_dir: A ``WanTransformer3DModel`` directory (``config.json`` + safetensors).
        dtype: Cast floating weights to this dtype (default: as stored).
        attention: Attention kernel for the network (default: SDPA).

    Raises:
        ValueError: For a bad directory (see :func:`load_wan_diffusers`) or weights that do not fit the
            config, naming the missing, unexpected and mis-shaped keys.
    """
    spec, state = load_wan_diffusers(model_dir)
    return build_wan(spec, cast_floating(state, dtype), source=model_dir, attention=attention)


def save_weights_file(
    state: Mapping[str, torch.Tensor], spec: WanSpec, path: Path | str, *, overwrite: bool = False
) -> Path:
    """Write a dfm weights file: ``state`` as safetensors with ``spec`` as JSON in its metadata."""
    out = Path(path)
    if out.exists() and not overwrite:
        raise ValueError(f"{out} already exists; choose another path or allow overwriting")
    out.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state.items()}
    tmp = out.with_name(out.name + ".tmp")
    save_file(tensors, tmp, metadata={"format": "pt", SPEC_KEY: json.dumps(attrs.asdict(spec))})
    os.replace(tmp, out)
    return out


def load_weights_file(path: Path | str) -> tuple[WanSpec, dict[str, torch.Tensor]]:
    """Read a dfm weights file written by :func:`save_weights_file` into ``(spec, state_dict)``."""
    src = Path(path)
    if not src.is_file():
        raise ValueError(f"{src}: no such file (expected a dfm weights .safetensors file)")
    try:
        with safe_open(src, framework="pt") as f:
            meta = f.metadata() or {}
            state = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not a mapping)
    except (SafetensorError, OSError) as err:
        raise ValueError(f"{src}: not a readable safetensors file ({err})") from err
    if SPEC_KEY not in meta:
        raise ValueError(f"{src}: no {SPEC_KEY!r} in its metadata; not a dfm weights file (import a diffusers dir)")
    try:
        fields = json.loads(meta[SPEC_KEY])
        if fields.get("arch") != "wan":
            raise ValueError(f"arch is {fields.get('arch')!r}, only 'wan' converts to diffusers")
        return WanSpec(**fields), state
    except (TypeError, ValueError, AttributeError) as err:
        raise ValueError(f"{src}: bad {SPEC_KEY!r} metadata: {err}") from err


def parse_size(text: str) -> int:
    """Bytes of a size such as ``5GB`` (10^9), ``500MB``, ``2GiB`` (2^30) or ``1000000``.

    Raises:
        ValueError: For anything else, or a size that is not positive.
    """
    found = re.fullmatch(r"\s*(\d+(?:\.\d*)?)\s*([A-Za-z]*)\s*", text)
    unit = found.group(2).lower() if found else ""
    if found is None or unit not in SIZE_UNITS:
        raise ValueError(f"{text!r} is not a size such as 5GB, 500MB or 2GiB")
    size = int(float(found.group(1)) * SIZE_UNITS[unit])
    if size <= 0:
        raise ValueError(f"{text!r}: the size must be positive")
    return size


def cast_floating(state: Mapping[str, torch.Tensor], dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
    """``state`` with floating tensors cast to ``dtype`` (unchanged when ``dtype`` is ``None``)."""
    if dtype is None:
        return dict(state)
    return {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}


# CLI -------------------------------------------------------------------------------------------


def _import(args: argparse.Namespace) -> str:
    spec, state = load_wan_diffusers(args.source)
    model = build_wan(spec, cast_floating(state, DTYPES[args.dtype]), source=args.source)
    out = save_weights_file(model.state_dict(), spec, args.out, overwrite=args.overwrite)
    return f"imported {args.source} ({_describe(spec, model.state_dict())}) -> {out}"


def _export(args: argparse.Namespace) -> str:
    shard = args.max_shard_size
    if args.max_shard_gb is not None:
        shard = int(args.max_shard_gb * 2**30)
    if args.checkpoint is not None:
        done = export_checkpoint(
            args.checkpoint,
            args.out,
            use_ema=not args.no_ema,
            dtype=DTYPES[args.dtype],
            max_shard_bytes=shard,
            overwrite=args.overwrite,
        )
        weights = "EMA weights" if done.weights == "ema" else "raw weights"
        ranks = f", {done.ranks} ranks" if done.ranks > 1 else ""
        return f"exported {weights} of {done.checkpoint} (step {done.step}{ranks}) -> {done.out}"
    spec, state = load_weights_file(args.source)
    model = build_wan(spec, cast_floating(state, DTYPES[args.dtype]), source=args.source)
    out = export_wan(model, spec, args.out, max_shard_bytes=shard, overwrite=args.overwrite)
    return f"exported {args.source} ({_describe(spec, model.state_dict())}) -> {out}"


def _export_lora(args: argparse.Namespace) -> str:
    if args.out.exists() and not args.overwrite:
        raise FileExistsError(f"{args.out} exists; pass --overwrite to replace it")
    done = export_lora(args.checkpoint, args.out, use_ema=not args.no_ema)
    weights = "EMA adapters" if done.weights == "ema" else "adapters"
    return f"exported {weights} of {done.checkpoint} (step {done.step}, {done.tensors} tensors) -> {done.out}"


def _merge_lora(args: argparse.Namespace) -> str:
    out = merge_lora(args.base, args.lora, args.out, dtype=DTYPES[args.dtype], overwrite=args.overwrite)
    return f"merged {', '.join(f'{f.path} x{f.scale:g}' for f in args.lora)} into {args.base} -> {out}"


def lora_arg(text: str) -> LoraFile:
    """``FILE`` or ``FILE:SCALE`` (a LoRA file and the scale its update is applied with)."""
    path, sep, scale = text.rpartition(":")
    if sep and path and not Path(text).exists():
        try:
            return LoraFile(path=Path(path), scale=float(scale))
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r}: expected FILE or FILE:SCALE with a number SCALE") from None
    return LoraFile(path=Path(text))


def _describe(spec: WanSpec, state: Mapping[str, torch.Tensor]) -> str:
    params = sum(t.numel() for t in state.values())
    dtypes = sorted({str(t.dtype).removeprefix("torch.") for t in state.values()})
    return f"{spec.num_layers} layers, hidden {spec.hidden_size}, {params / 1e6:.1f}M parameters, {'/'.join(dtypes)}"


def _size(text: str) -> int:
    try:
        return parse_size(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


_EXAMPLES = """examples:
  python -m dfm.app.convert import --from ckpts/Wan2.1-T2V-1.3B-Diffusers/transformer --out wan-1.3b.safetensors
  python -m dfm.app.convert export --from wan-1.3b.safetensors --out exported/transformer --dtype bf16
  python -m dfm.app.convert export --checkpoint runs/demo --out exported/demo
  torchrun --nproc-per-node 8 -m dfm.app.convert export --checkpoint runs/wan14b --out exported/wan14b \\
      --dtype bf16 --max-shard-size 5GB
  python -m dfm.app.convert export-lora --checkpoint runs/my_lora --out my_lora.safetensors
  python -m dfm.app.convert merge-lora --base exported/transformer --lora my_lora.safetensors:0.8 --out merged

errors (a missing or malformed file, weights that do not fit the config, a checkpoint that cannot be
exported) print one line to stderr and exit with status 2."""


def build_parser() -> argparse.ArgumentParser:
    """The ``python -m dfm.app.convert`` argument parser."""
    parser = argparse.ArgumentParser(
        prog="python -m dfm.app.convert",
        description="Convert WAN 2.1 transformer weights between a dfm weights file (one .safetensors with the "
        "spec in its metadata) or a training checkpoint and a diffusers WanTransformer3DModel directory "
        "(config.json + safetensors). Parameter names are identical; nothing is renamed, nothing is pickled.",
        epilog=_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="{import,export,export-lora,merge-lora}")
    imp = sub.add_parser(
        "import",
        help="diffusers directory -> dfm weights file",
        description="Read a diffusers WanTransformer3DModel directory, check every weight against its config, "
        "and write one dfm weights file.",
    )
    imp.add_argument(
        "--from",
        dest="source",
        required=True,
        type=Path,
        metavar="DIR",
        help="diffusers WanTransformer3DModel directory (save_pretrained layout; sharded is fine)",
    )
    imp.add_argument("--out", required=True, type=Path, metavar="FILE.safetensors", help="dfm weights file to write")
    exp = sub.add_parser(
        "export",
        help="dfm weights file or training checkpoint -> diffusers directory",
        description="Write a dfm weights file or a training checkpoint's WAN weights as a diffusers "
        "WanTransformer3DModel directory (config.json + diffusion_pytorch_model*.safetensors) that diffusers' "
        "from_pretrained loads. From a checkpoint the training config goes beside the weights as "
        "dfm_config.yaml, so `python -m dfm.app.generate --checkpoint DIR` samples from it. Launched by "
        "torchrun with a process count that fits the checkpoint's parallel layout, every rank restores and "
        "writes only its shards; one process loads any checkpoint whole.",
    )
    source = exp.add_mutually_exclusive_group(required=True)
    source.add_argument(
        "--from",
        dest="source",
        type=Path,
        metavar="FILE.safetensors",
        help="dfm weights file (from `import`)",
    )
    source.add_argument(
        "--checkpoint",
        type=Path,
        metavar="RUN_DIR|CHECKPOINT",
        help="training run directory (its newest checkpoint) or one checkpoint directory; WAN models only",
    )
    exp.add_argument(
        "--out",
        required=True,
        type=Path,
        metavar="DIR",
        help="directory to write; WanTransformer3DModel.from_pretrained(DIR) loads it",
    )
    exp.add_argument(
        "--no-ema",
        action="store_true",
        help="with --checkpoint: export the raw training weights even when the checkpoint keeps EMA weights",
    )
    shard = exp.add_mutually_exclusive_group()
    shard.add_argument(
        "--max-shard-size",
        type=_size,
        default=None,
        metavar="SIZE",
        help="split the weights into files of at most SIZE (5GB = 5*10^9 bytes, 2GiB = 2*2^30), with an index",
    )
    shard.add_argument(
        "--max-shard-gb",
        type=float,
        default=None,
        metavar="GB",
        help="the same in gibibytes",
    )
    for p in (imp, exp):
        p.add_argument(
            "--dtype",
            choices=list(DTYPES),
            default="keep",
            help="cast floating weights (default: keep the stored dtypes; checkpoints hold float32)",
        )
        p.add_argument("--overwrite", action="store_true", help="replace an existing output")
        p.set_defaults(run=_import if p is imp else _export)
    _lora_parsers(sub)
    return parser


def _lora_parsers(sub: argparse._SubParsersAction) -> None:
    exp = sub.add_parser(
        "export-lora",
        help="LoRA run checkpoint -> diffusers-format adapter file",
        description="Write a LoRA run's adapters (EMA when kept) as one safetensors file in the diffusers naming "
        "(transformer.<module>.lora_A/lora_B.weight, alpha/rank folded into lora_B), which "
        "WanPipeline.load_lora_weights and WanTransformer3DModel.load_lora_adapter load.",
    )
    exp.add_argument(
        "--checkpoint", required=True, type=Path, metavar="RUN_DIR|CHECKPOINT", help="LoRA run or checkpoint"
    )
    exp.add_argument("--out", required=True, type=Path, metavar="FILE.safetensors", help="adapter file to write")
    exp.add_argument("--no-ema", action="store_true", help="export the raw adapters even when EMA ones exist")
    exp.add_argument("--overwrite", action="store_true", help="replace an existing file")
    exp.set_defaults(run=_export_lora)
    merge = sub.add_parser(
        "merge-lora",
        help="diffusers directory + LoRA files -> diffusers directory with the adapters folded in",
        description="Add scale * B A of each LoRA file (diffusers, WAN/kohya or musubi naming) to the weights of a "
        "diffusers WanTransformer3DModel directory and write the result as another (dfm_config.yaml copied along).",
    )
    merge.add_argument(
        "--base", required=True, type=Path, metavar="DIR", help="diffusers WanTransformer3DModel directory"
    )
    merge.add_argument(
        "--lora", required=True, action="append", type=lora_arg, metavar="FILE[:SCALE]", help="adapter file; repeat"
    )
    merge.add_argument("--out", required=True, type=Path, metavar="DIR", help="directory to write")
    merge.add_argument("--dtype", choices=list(DTYPES), default="keep", help="cast floating weights")
    merge.add_argument("--overwrite", action="store_true", help="replace the WAN files of an --out holding some")
    merge.set_defaults(run=_merge_lora)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; user errors go to stderr as one line with exit status 2 (under torchrun: from every rank)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "max_shard_gb", None) is not None and args.max_shard_gb <= 0:
        parser.error("--max-shard-gb must be positive")  # exits with status 2
    if getattr(args, "no_ema", False) and getattr(args, "checkpoint", None) is None:
        parser.error("--no-ema applies to --checkpoint (a dfm weights file holds one set of weights)")
    try:
        text = args.run(args)
    except (ValueError, FileNotFoundError, FileExistsError, PermissionError) as err:
        print(f"error: {' '.join(str(err).splitlines())}", file=sys.stderr)
        return 2
    if int(os.environ.get("RANK", "0")) == 0:
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
