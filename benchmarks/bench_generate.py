"""Data-free generation throughput (issue #5): ``ppap_fast.distributed.generate`` (unguided DDIM-25,
uint8 shards, one process) of ``PPAP_GEN_IMAGES`` images (default 1000 on cuda, 32 on cpu).

cuda: ADM-256 uncond with random weights, saved and loaded through the real checkpoint path;
cpu: the tiny ADM-16 of bench_scale, so the suite stays tested. A suite of its own so that a
time-limited GPU run keeps bench_scale's sampling rows when generation does not finish.
"""
from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_scale import _models, _timed  # noqa: E402


def generation_row(device: str, quick: bool):
    from ppap_fast.distributed import DistEnv, GenerateConfig, generate

    cuda = device == "cuda"
    n_images = int(os.environ.get("PPAP_GEN_IMAGES", 1000 if cuda else 32))
    batch = 64 if cuda else 16
    with tempfile.TemporaryDirectory(prefix="ppap_gen_") as d:
        ckpt = None
        model, _, shape, name, spec = _models(cuda)
        if cuda:  # random ADM-256 weights through the real loading path
            ckpt = str(Path(d) / "adm256_random.pt")
            torch.save(model.state_dict(), ckpt)
        del model
        cfg = GenerateConfig(out_dir=str(Path(d) / "set"), num_images=n_images, shard_size=batch, batch_size=batch,
                             image_size=shape[-1], channels=3, denoiser=spec, checkpoint=ckpt,
                             respacing="ddim25", device=device)
        env = DistEnv(device=torch.device("cuda", 0) if cuda else torch.device("cpu"))  # one process
        t = _timed(lambda: generate(cfg, env), device)
        from ppap_fast.data import load_shards

        got = load_shards(cfg.out_dir)["images"].shape[0]
    if got != n_images:
        raise AssertionError(f"generation wrote {got} images, asked for {n_images}")
    return {"bench": "datafree_generation_ddim25", "config": spec, "device": device, "images": n_images,
            "batch": batch, "seconds": round(t, 3), "images_per_s": round(n_images / t, 3),
            "note": "includes model build and checkpoint load; fast path (FastGuidedSampler: on CUDA CUDA graphs "
                    "and recommended_options)"}


def run(device: str = "cpu", quick: bool = False) -> dict:
    return {"rows": [generation_row(device, quick)], "ratios": {}}
