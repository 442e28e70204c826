"""Show versions, compute devices (with memory and bf16 support) and the models on this machine."""

from __future__ import annotations

import argparse
import json
import platform

HELP = "versions, devices and available models"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print machine-readable JSON")


def collect() -> dict:
    """Everything ``cellmae info`` reports, as a dict."""
    import torch

    from .. import __version__
    from ..devices import available_devices
    from ..registry import cellmae_home, hf_hub_cache, list_models

    return {
        "napari_cellmae": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "devices": [
            {
                "name": d.name,
                "description": d.description,
                "total_memory_gib": round(d.total_memory / 1024**3, 2) if d.total_memory else None,
                "free_memory_gib": round(d.free_memory / 1024**3, 2)
                if d.free_memory is not None
                else None,
                "bf16": d.bf16,
            }
            for d in available_devices()
        ],
        "models": [
            {"name": m.name, "source": m.source, "kind": m.kind, "note": m.note}
            for m in list_models()
        ],
        "cellmae_home": str(cellmae_home()),
        "hf_hub_cache": str(hf_hub_cache()),
    }


def run(args: argparse.Namespace) -> int:
    info = collect()
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    print(f"napari-cellmae {info['napari_cellmae']}")
    print(f"python         {info['python']}")
    print(f"torch          {info['torch']}")
    print("devices:")
    for d in info["devices"]:
        mem = ""
        if d["total_memory_gib"]:
            free = f"{d['free_memory_gib']} of " if d["free_memory_gib"] is not None else ""
            mem = f", {free}{d['total_memory_gib']} GiB free"
        print(f"  {d['name']:<8} {d['description']}{mem}, bf16: {'yes' if d['bf16'] else 'no'}")
    print("models:")
    if not info["models"]:
        print("  (none)")
    for m in info["models"]:
        kind = {
            "bundled": "bundled",
            "local": "local folder",
            "hub-cached": "downloaded",
            "hub": "not downloaded",
        }[m["kind"]]
        where = "" if m["source"] == m["name"] else f"  {m['source']}"
        print(f"  {m['name']:<28} [{kind}]{where}")
        if m["note"]:
            print(f"      {m['note']}")
    print(f"models folder  {info['cellmae_home']}")
    print(f"hub cache      {info['hf_hub_cache']}")
    return 0
