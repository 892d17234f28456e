"""The naive baseline: what OpenRLHF's ``serve_rm`` does, with the same model and formatting.

One synchronous forward per request inside the ``async`` handler (so requests run one after
another, and the event loop waits on the model), every request padded to the model's maximum
length.  No queue, no batching across requests, no length sorting, no prefix reuse.

    python -m service.bench.naive --model DIR [--backend torch|onnx] [--dtype …] --port N
"""

from __future__ import annotations

import argparse
from typing import Any

import numpy as np
from fastapi import FastAPI, Request  # module level: the handler's annotations are resolved by name


def padded_scores(backend: Any, batch: list[Any]) -> list[float]:
    """Rewards of ``batch`` padded to the model's maximum length (the naive cost)."""
    from ..backends.base import pad_batch

    length = backend.formatter.max_length
    if backend.info.kind == "onnx":
        ids, mask, types = pad_batch(batch, backend._pad, "token_type_ids" in backend._inputs, length)
        feeds: dict[str, Any] = {"input_ids": ids, "attention_mask": mask}
        if types is not None:
            feeds["token_type_ids"] = types
        (rewards,) = backend.session.run(["reward"], feeds)
        return np.asarray(rewards, dtype=np.float64).tolist()
    import torch

    from ..backends.modeling import reward_forward

    ids, mask, types = pad_batch(batch, backend._pad, backend._types, length)
    with torch.inference_mode():
        dev = backend.device
        out = reward_forward(backend.loaded.model, torch.from_numpy(ids).to(dev), torch.from_numpy(mask).to(dev),
                             torch.from_numpy(types).to(dev) if types is not None else None)  # (B,)
    return out.float().cpu().tolist()


def create_app(model: dict[str, Any], threads: int | None) -> Any:
    from ..backends import load_backend
    from ..config import ModelConfig

    if threads:
        import torch

        torch.set_num_threads(threads)
    backend = load_backend(ModelConfig.model_validate({**model, "reuse_prefix": False}), None, threads)
    app = FastAPI()

    @app.get("/ready")
    async def ready() -> dict[str, bool]:
        return {"ready": True}

    @app.post("/v1/score")
    async def score(request: Request) -> dict[str, Any]:
        body = await request.json()
        batch = [backend.formatter.encode(it["prompt"], it["response"], allow_truncation=True) for it in body["items"]]
        return {"rewards": padded_scores(backend, batch)}  # blocks the loop: the baseline's way

    return app


def main() -> None:
    import uvicorn

    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", required=True)
    ap.add_argument("--backend", default="torch")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--quantize", default="none")
    ap.add_argument("--max-length", type=int, default=None)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--port", type=int, required=True)
    a = ap.parse_args()
    model = {"name": "naive", "path": a.model, "backend": a.backend, "dtype": a.dtype, "device": a.device,
             "quantize": a.quantize, "max_length": a.max_length}
    uvicorn.run(create_app(model, a.threads), host="127.0.0.1", port=a.port, log_level="warning")


if __name__ == "__main__":
    main()
