"""Inference: seconds per clip for the embedded preset, split into the pipeline (decode, faces,
encoders, ASR: ``VideoProcessor`` on the one clip) and generation (``MicroEmo.generate``), as
``jobs.infer.infer_video`` reports them in its ``timings``.

The clips run in a process of their own with this shell's environment (thread counts as for
``microemo infer``). The model is loaded once (timed apart) and passed to every call, as a
service would keep it; the first clip is reported apart too (cold: lazy loads, first-use
costs). Clips are given without transcripts, so the pipeline includes ASR, as for a user's own
video. Without ``--model-dir`` the benchmark times a random-initialised embedded model (SmolLM2
base, random encoders, identity LoRA): its answers are noise, so generation may run to
``max_new_tokens``; the number of generated tokens is recorded beside the time.

Child entry point: ``python -m bench.infer MODEL_DIR CLIP [CLIP ...] RESULT_JSON``.
"""

from __future__ import annotations

import importlib.util
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from bench import child, corpus
from bench.report import Result


@dataclass
class Sizes:
    clips: int = 6  # the first is the cold call, the rest are averaged


FULL, QUICK = Sizes(), Sizes(clips=2)


def build_model(out: Path) -> Path:
    """A random-initialised embedded-preset weights directory (``model.weights`` layout), built once."""
    import torch

    from model.config import preset
    from model.microemo import MicroEmo
    from model.weights import CONFIG_FILE, save_weights

    d = out / "infer_model_embedded"
    if not (d / CONFIG_FILE).is_file():
        torch.manual_seed(0)
        save_weights(MicroEmo.from_config(preset("embedded"), device="cpu"), d)
    return d


def time_clips(model_dir: str, clips: list[str]) -> dict:
    """(child) Load the model once, then ``infer_video`` each clip; the timings of each call."""
    from jobs.infer import infer_video
    from jobs.predict import load_model

    t0 = time.perf_counter()
    net = load_model(model_dir)
    load_s = time.perf_counter() - t0
    calls = []
    for clip in clips:
        r = infer_video(clip, model_dir, model_obj=net)
        calls.append({"video": Path(clip).name, "duration_s": r["duration_s"], **r["timings"],
                      "new_tokens": len(net.tokenizer(r["raw"])["input_ids"])})
    import torch

    return {"load_s": load_s, "calls": calls, "device": str(net.device), "torch_threads": torch.get_num_threads()}


def main(ctx) -> Result:
    sizes = QUICK if ctx.quick else FULL
    res = Result("infer", ctx.quick, details={"sizes": asdict(sizes)})
    if importlib.util.find_spec("jobs.infer") is None:
        res.skip("seconds per clip (embedded)", "jobs.infer not available")
        return res
    model_dir = Path(ctx.model_dir) if ctx.model_dir else build_model(ctx.out)
    clips = [str(c.resolve()) for c in corpus.videos(ctx.out, sizes.clips)]
    print(f"== infer: {len(clips)} clips, model {model_dir} ==", flush=True)
    got, _ = child.run("bench.infer", [str(model_dir.resolve()), *clips], ctx.out / "logs", "infer")
    calls = got["calls"]
    warm = calls[1:] or calls
    mean = {k: statistics.fmean(c[k] for c in warm) for k in ("pipeline_s", "generate_s", "new_tokens", "duration_s")}
    res.details.update(got, model_dir=str(model_dir), trained=bool(ctx.model_dir), mean=mean)
    n = f"mean of {len(warm)} clip{'s' if len(warm) > 1 else ''}"
    res.add(f"pipeline per clip ({n}, {mean['duration_s']:.1f} s of video)", mean["pipeline_s"], "s")
    res.add(f"generation per clip ({n}, {mean['new_tokens']:.0f} new tokens)", mean["generate_s"], "s")
    res.add("total per clip", mean["pipeline_s"] + mean["generate_s"], "s")
    res.add("first clip (cold), total", calls[0]["pipeline_s"] + calls[0]["generate_s"], "s")
    res.add("model load (once)", got["load_s"], "s")
    return res


if __name__ == "__main__":
    *_clips, _result = sys.argv[2:]
    child.write_result(_result, time_clips(sys.argv[1], _clips))
