"""``speechssl extract``'s speed against a plain per-utterance loop, and its peak memory as the corpus grows.

Speed: the same model, the same cuts and the same output (one layer, fp16, one ``.npy`` per cut) through
(a) ``speechssl.extract.extract_corpus`` (batches of ``--max-duration`` padded seconds by duration, audio read by
``--num-workers`` loader processes while the model runs, arrays and manifest written as it goes) and (b) a plain
loop (read a cut's audio, forward it alone, save its array: fairseq's ``dump_hubert_feature.py``). The two
alternate for ``--rounds`` rounds in one process on ``--threads`` torch threads; the median of each is reported
as audio hours per hour, and the median of the rounds' ratios (target >= 3x on 2 CPU threads). On a shared
machine wall time drifts with other jobs' load; audio seconds per CPU second (process, threads and loader workers)
is reported too, with its ratio, as the load-independent measure of the work each path does.

Memory: ``extract`` on a corpus of N cuts (``--memory-cuts``, enough to fill batches of
``--memory-max-duration``) and of 4N cuts (the same cuts repeated under new ids), each in a fresh subprocess: the
peak resident set of the extracting process (``VmHWM``; its loader worker holds one batch of audio at a time) and
the peak of the Python objects it allocated (``tracemalloc``). Flat means the 4N run's resident peak is within
``--memory-tolerance`` MiB of the N run's. The resident peak rises over the first few dozen batches while the
allocator meets new tensor shapes and then stays level; Python objects stay level from the start.

    python bench/extract.py                      # tiny_hubert, 120 cuts of 1-12 s, 2 threads, 2 rounds
    python bench/extract.py --preset hubert_base --cuts 40 --rounds 1
    python bench/extract.py --quick              # a fast correctness pass
Synthetic audio and a random-init model: nothing is downloaded. Results go to stdout as JSON (``--json FILE`` too).
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))


def make_corpus(d: Path, n: int, seed: int = 0, min_s: float = 1.0, max_s: float = 12.0) -> Path:
    """``n`` synthetic utterances of ``min_s``-``max_s`` seconds and their cut manifest."""
    import soundfile as sf
    from conftest import make_wav
    from lhotse import CutSet, Recording

    rng = np.random.default_rng(seed)
    cuts = []
    for i in range(n):
        p = d / f"utt{i:05d}.wav"
        sf.write(p, make_wav(int(rng.uniform(min_s, max_s) * 16000), seed=i), 16000)
        cuts.append(Recording.from_file(p, recording_id=f"utt{i:05d}").to_cut())
    path = d / f"cuts_{n}.jsonl.gz"
    CutSet.from_cuts(cuts).to_file(path)
    return path


def repeat_corpus(src: Path, times: int, out: Path) -> Path:
    """The cuts of ``src`` ``times`` times over, each copy under new ids (the same audio files)."""
    from lhotse import CutSet

    cuts = list(CutSet.from_file(src))
    CutSet.from_cuts([c.with_id(f"{c.id}-r{k}") for k in range(times) for c in cuts]).to_file(out)
    return out


def plain_loop(model, cuts_path: Path, out: Path, layer: int) -> float:
    """Per-utterance extraction; returns seconds of audio done."""
    import torch
    from lhotse import CutSet

    from speechssl.data.audio import load_cut_audio

    out.mkdir(parents=True, exist_ok=True)
    seconds = 0.0
    with torch.inference_mode():
        for cut in CutSet.from_file(cuts_path):
            wav = torch.from_numpy(load_cut_audio(cut))[None]
            h = model(wav).hidden_states[layer][0]
            np.save(out / f"{cut.id}.npy", h.numpy().astype(np.float16))
            seconds += wav.shape[1] / 16000
    return seconds


def extract_path(model, cuts_path: Path, out: Path, layer: int, max_duration: float, workers: int) -> float:
    from speechssl.extract import ExtractOptions, HiddenStates, LayerEncoder, extract_corpus

    src = HiddenStates(LayerEncoder(model, [layer]), dtype="fp16")
    rec = extract_corpus(cuts_path, out, src, options=ExtractOptions(max_duration=max_duration,
                                                                     num_workers=workers), progress=False)
    return rec["audio_hours"] * 3600


def speed(args, cuts_path: Path, work: Path) -> dict:
    import torch

    from speechssl.models import build_encoder

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = build_encoder(args.preset).eval()
    runs: dict[str, list[float]] = {"extract": [], "plain": []}
    cpu: dict[str, list[float]] = {"extract": [], "plain": []}
    for r in range(args.rounds):
        for name in ("extract", "plain"):
            t, c = time.perf_counter(), cpu_seconds()
            if name == "extract":
                secs = extract_path(model, cuts_path, work / f"x{r}", args.layer, args.max_duration, args.num_workers)
            else:
                secs = plain_loop(model, cuts_path, work / f"p{r}", args.layer)
            runs[name].append(secs / (time.perf_counter() - t))  # audio hours per hour = audio s per wall s
            cpu[name].append(secs / (cpu_seconds() - c))  # audio s per CPU s (all threads, loader workers)
            print(f"round {r} {name}: {runs[name][-1]:.1f} audio-h/h, {cpu[name][-1]:.1f} audio-s per CPU-s",
                  file=sys.stderr, flush=True)
    med = {k: float(np.median(v)) for k, v in runs.items()}
    # each round's two runs are neighbours in time: their ratio cancels most of a shared machine's load drift
    ratios = [a / b for a, b in zip(runs["extract"], runs["plain"])]
    cpu_ratios = [a / b for a, b in zip(cpu["extract"], cpu["plain"])]
    return {"audio_hours": secs / 3600, "rounds": runs, "extract_audio_h_per_h": med["extract"],
            "plain_audio_h_per_h": med["plain"], "round_speedups": ratios, "speedup": float(np.median(ratios)),
            "audio_s_per_cpu_s": cpu, "cpu_speedup": float(np.median(cpu_ratios)), "target": 3.0}


def cpu_seconds() -> float:
    """CPU time of this process (all threads) and of its finished children (loader workers)."""
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def peak_rss_mb() -> float:
    """This process's own peak resident set (``VmHWM``, MiB). Not ``ru_maxrss``: Linux carries that over from the
    parent through fork and exec, so a child started by a big bench process would report the parent's peak."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # not Linux: may include the parent's


def child_memory(args) -> None:
    """In a fresh process: extract ``args.child`` and print its peak RSS (MiB) after loading and at the end."""
    import torch

    from speechssl.models import build_encoder

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = build_encoder(args.preset).eval()
    base = peak_rss_mb()
    tracemalloc.start()  # Python objects only: what would grow per cut if anything were kept
    extract_path(model, Path(args.child), Path(args.child_out), args.layer, args.max_duration, args.num_workers)
    print(json.dumps({"model_loaded_mb": base, "peak_mb": peak_rss_mb(),
                      "python_peak_mb": tracemalloc.get_traced_memory()[1] / 2**20}))


def memory(args, work: Path) -> dict:
    n = args.memory_cuts
    cuts_path = make_corpus(work, n, seed=1)
    out = {}
    for times in (1, 4):
        path = repeat_corpus(cuts_path, times, work / f"mem_{times}.jsonl.gz")
        cmd = [sys.executable, __file__, "--child", str(path), "--child-out", str(work / f"mem_out_{times}"),
               "--preset", args.preset, "--threads", str(args.threads), "--layer", str(args.layer),
               "--max-duration", str(args.memory_max_duration), "--num-workers", str(args.num_workers)]
        res = subprocess.run(cmd, capture_output=True, text=True, check=True)
        out[f"{n * times}_cuts"] = json.loads(res.stdout.strip().splitlines()[-1])
    small, big = out[f"{n}_cuts"]["peak_mb"], out[f"{4 * n}_cuts"]["peak_mb"]
    out["growth_mb"] = big - small
    out["flat"] = big - small <= args.memory_tolerance
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="tiny_hubert")
    ap.add_argument("--cuts", type=int, default=120)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--layer", type=int, default=3)
    ap.add_argument("--max-duration", type=float, default=100.0)
    ap.add_argument("--num-workers", type=int, default=1)
    ap.add_argument("--memory-cuts", type=int, default=60, help="N of the memory runs (N and 4N cuts)")
    ap.add_argument("--memory-max-duration", type=float, default=20.0,
                    help="batch seconds of the memory runs: N cuts must fill every duration bucket's batches, or "
                         "the 4N run's fuller batches would pass for growth with the corpus")
    ap.add_argument("--memory-tolerance", type=float, default=30.0, help="MiB a flat peak may grow by")
    ap.add_argument("--quick", action="store_true", help="20 cuts, 1 round")
    ap.add_argument("--json", help="also write the results here")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--child-out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child_memory(args)
    if args.quick:
        args.cuts, args.rounds, args.memory_cuts = 20, 1, 20
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        cuts_path = make_corpus(work, args.cuts)
        result = {"preset": args.preset, "cuts": args.cuts, "threads": args.threads, "layer": args.layer,
                  "max_duration": args.max_duration, "num_workers": args.num_workers,
                  "speed": speed(args, cuts_path, work), "memory": memory(args, work)}
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        Path(args.json).write_text(text + "\n")


if __name__ == "__main__":
    main()
