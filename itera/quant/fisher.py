"""What one calibration pass says about every tensor's sensitivity: the planner's predicted KL.

The KL divergence of the next-token distribution from the float model's, for a small change
``dtheta`` to the weights, is to second order ``1/2 E[(G . dtheta)^2]`` per token, with ``G`` the
gradient of the log-likelihood of labels *sampled from the model itself* (not the text's next
tokens): the expectation of ``G G^T`` over such labels is the Fisher information. The gradients
of different positions' terms are uncorrelated, so one backward pass over a sequence's summed
loss gives an unbiased estimate of the sum over its positions. For one matrix ``G . dtheta`` is
``sum(dW * g^T x)`` (``g``: the gradient at its output, ``x``: its input, over the positions), so
a change can be *probed* in the backward pass, one matrix's gradient at a time, and no weight
gradient is kept; an input's rounding ``dx`` is met the same way, ``sum((g W) * dx)``.

Probing every tensor at every candidate type would keep a copy of the model per type. Instead:

- each tensor's change at two reference types (a 4-bit one and its cheapest), and the change each
  input rounding makes (llama.cpp's CPU backend rounds a product's input to 8 bits in blocks of 32
  or 256, or to float16, by the weight's type), are probed exactly;
- every type's weight change is scored by the diagonal formula
  ``1/2 * sum_o f_o * sum_i E[x_i^2] * dW_oi^2`` (``f_o``: the mean squared output gradient;
  ``E[x_i^2]``: the importance data), which is cheap but ignores how a change at one position
  reaches later ones through attention (off by up to 10x on value and query matrices);
- the formula is rescaled per tensor so that it equals the probed KL at the reference types (the
  scale interpolated between them), and the probed KL of the type's input rounding is added.

So one forward pass and a few backward passes over the calibration windows, and one quantization
per tensor and type, give every candidate's cost: no forward pass per candidate. An embedding row
is a lookup: its diagonal formula is the Fisher of the embedding output summed over the positions
holding that token, and rows of tokens the calibration text lacks are given the mean position's
Fisher, weighted as one occurrence, rather than nothing.
"""

from __future__ import annotations

import math

import torch

from itera.memory import release_free_memory
from itera.storage.ggml import Q8_0_INPUT, Q8_K_INPUT, input_as_llama_cpp

def input_scheme(weight_type: str) -> str | None:
    """Which input rounding a product with a ``weight_type`` weight gets (None: the input as it is)."""
    if weight_type == "F16":
        return "F16"
    if weight_type in Q8_0_INPUT:
        return "Q8_0"
    if weight_type in Q8_K_INPUT:
        return "Q8_K"
    return None


class FisherStats:
    """Per matrix product: ``out_fisher`` (out,), the mean over positions of the squared gradient
    at each output; ``input_ms`` (in,), the input's mean square. For the token embedding: ``embed``
    (vocab, hidden), the Fisher of each row. ``probed``: tensor -> key -> the KL of a probed change
    (see :func:`fisher_stats`). ``tokens``: positions measured."""

    def __init__(self):
        self.out_fisher: dict[str, torch.Tensor] = {}
        self.input_ms: dict[str, torch.Tensor] = {}
        self.embed: torch.Tensor | None = None
        self.probed: dict[str, dict[str, float]] = {}
        self.tokens = 0


def fisher_stats(model, calib: torch.Tensor, seed: int = 0, chunk: int = 1, draws: int = 1,
                 probes: dict | None = None, progress=None) -> FisherStats:
    """One forward pass over ``calib`` (samples, seqlen), ``chunk`` sequences at a time (memory: one
    chunk's activations and no weight gradients), and ``draws`` backward passes per chunk, each with
    labels sampled from the model's own distribution.

    ``probes``: tensor name -> key -> (a change to the weight, or None and the type whose input
    rounding is probed): :func:`probes_for`. Each is scored as the module's note says: the mean of
    ``(G . dtheta)^2 / 2`` per token, without the diagonal formula's approximation."""
    st = FisherStats()
    probes = probes or {}
    gen = torch.Generator(device="cpu").manual_seed(seed)
    linears = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    emb = model.model.embed_tokens
    tied = model.lm_head.weight is emb.weight
    probe_of = {n: ("model.embed_tokens" if n == "lm_head" and tied else n) for n in linears}
    sums_g: dict[str, torch.Tensor] = {}
    sums_x: dict[str, torch.Tensor] = {}
    dots: dict[tuple, float] = {}  # (tensor, key) -> G . dtheta of the draw being run
    squares: dict[tuple, float] = {}
    hooks = []

    def add(d: dict, k, v):
        d[k] = d[k] + v if k in d else v

    def pre_hook(name):
        def hook(_m, args):
            x = args[0].detach().float().flatten(0, -2)
            add(sums_x, name, (x * x).sum(0))
        return hook

    def out_hook(name):
        def hook(m, args, out):
            if not out.requires_grad:
                return
            x = args[0].detach()  # the tensor autograd keeps for this product's backward: no copy
            mine = probes.get(probe_of[name], {})

            def grad(g):
                g = g.detach().float().flatten(0, -2)
                add(sums_g, name, (g * g).sum(0))
                if not mine:
                    return
                xf = x.float().flatten(0, -2)
                grad_x = None
                for key, (dw, wtype) in mine.items():
                    if dw is None:  # the input's rounding alone: the output's change is (x~ - x) W^T
                        grad_x = g @ m.weight.float() if grad_x is None else grad_x
                        v = float((grad_x * (input_as_llama_cpp(xf, wtype) - xf)).sum())
                    else:  # the weight's change alone: G . dW = sum(dW * g^T x)
                        v = dw.dot_outer(g, xf)
                    add(dots, (probe_of[name], key), v)
            out.register_hook(grad)
        return hook

    vocab, hidden = emb.weight.shape
    seen = torch.unique(calib.cpu())  # the embedding rows the pass reads: their Fisher is kept
    row_of = torch.full((vocab,), -1, dtype=torch.long)
    row_of[seen] = torch.arange(seen.numel())
    seen_fisher = torch.zeros(seen.numel(), hidden)
    current: list[torch.Tensor] = []

    def emb_hook(_m, _args, out):
        ids = current[0]
        out = out.detach().requires_grad_()  # the graph starts here: no weight gradients are kept

        def grad(g):
            g = g.detach().float()
            flat = ids.reshape(-1).cpu()
            seen_fisher.index_add_(0, row_of[flat], (g * g).reshape(flat.numel(), -1).cpu())
            for key, (dw, _t) in probes.get("model.embed_tokens", {}).items():
                if dw is not None:  # a lookup rounds no input; the rows it read changed by dW[ids]
                    add(dots, ("model.embed_tokens", key), float((dw.expand(ids) * g).sum()))
        out.register_hook(grad)
        return out

    for n, m in linears.items():
        hooks.append(m.register_forward_pre_hook(pre_hook(n)))
        hooks.append(m.register_forward_hook(out_hook(n)))
    hooks.append(emb.register_forward_hook(emb_hook))
    flags = [p.requires_grad for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(False)
    try:
        for i in range(0, calib.shape[0], chunk):
            ids = calib[i:i + chunk]
            current[:] = [ids]
            with torch.enable_grad():
                logits = model(ids).float()
                probs = torch.softmax(logits.detach(), -1).reshape(-1, logits.shape[-1]).cpu()
                logp = torch.log_softmax(logits, -1).reshape(-1, logits.shape[-1])
                for d in range(draws):
                    labels = torch.multinomial(probs, 1, generator=gen).to(logits.device)
                    dots.clear()
                    logp.gather(1, labels).sum().backward(retain_graph=d < draws - 1)
                    for k, v in dots.items():
                        squares[k] = squares.get(k, 0.0) + v * v
            st.tokens += ids.numel()
            release_free_memory()  # this sequence's activations: freed, and handed back (see itera.memory)
            if progress:
                progress(min(i + chunk, calib.shape[0]))
    finally:
        for h in hooks:
            h.remove()
        for p, f in zip(model.parameters(), flags):
            p.requires_grad_(f)
    n = max(st.tokens, 1) * draws  # every sum above ran over each position once per draw
    st.out_fisher = {k: (v / n).cpu() for k, v in sums_g.items()}
    st.input_ms = {k: (v / (n / draws)).cpu() for k, v in sums_x.items()}
    for (name, key), v in squares.items():
        st.probed.setdefault(name, {})[key] = 0.5 * v / n
    # an unseen row: the mean position's Fisher, as if it occurred once (the module's note)
    st.embed = (seen_fisher.sum(0) / n / (n / draws)).expand(vocab, hidden).clone()
    st.embed[seen] = seen_fisher / n
    return st


def reference_types(candidates) -> list[str]:
    """The types whose weight change is probed exactly for a tensor: a mid-range one and its
    cheapest K-quant or 4-bit candidate (low types' errors reach the output more coherently than the
    diagonal formula says: Q2_K's KL is 3x what the formula scaled at Q4_K predicts)."""
    mid = next((t for t in ("Q4_K", "Q4_0", "Q5_0", "Q8_0") if t in candidates), None)
    low = next((t for t in ("Q2_K", "Q3_K", "IQ4_XS", "Q4_0", "IQ4_NL") if t in candidates), None)
    return [t for t in dict.fromkeys((mid, low)) if t is not None]


class Change:
    """A weight change kept in 4 bits per weight with a float32 scale per 32 weights of a row (0.625
    bytes per weight, a sixth of the float32 tensor; each weight within 1/14 of its block's largest
    change, which adds about 0.5% to a probed KL: the rounding's own square, uncorrelated with
    the change)."""

    BLOCK = 32

    def __init__(self, dw: torch.Tensor):
        import torch.nn.functional as F

        rows, self.cols = dw.shape
        b = F.pad(dw.float(), (0, -self.cols % self.BLOCK)).reshape(rows, -1, self.BLOCK)
        self.scale = b.abs().amax(-1, keepdim=True) / 7
        c = (torch.round(b / self.scale.clamp_min(1e-30)).clamp(-7, 7) + 8).to(torch.uint8)
        self.codes = c[..., 0::2] | (c[..., 1::2] << 4)  # (rows, blocks, 16): two codes a byte

    @classmethod
    def of(cls, q, w: torch.Tensor, importance, rows: int = 4096) -> "Change":
        """The change that storing ``w`` as ``q`` makes, ``rows`` rows at a time (each row is
        quantized on its own: the same change, without full-size float temporaries)."""
        parts = [cls(q.expand(*q.quantize(w[r:r + rows], importance)) - w[r:r + rows])
                 for r in range(0, w.shape[0], rows)]
        out = cls.__new__(cls)
        out.cols = w.shape[1]
        out.scale, out.codes = torch.cat([p.scale for p in parts]), torch.cat([p.codes for p in parts])
        return out

    def expand(self, rows=None) -> torch.Tensor:
        """The change as float32, of ``rows`` (indices of any shape, or a slice) only when given."""
        codes, scale = (self.codes, self.scale) if rows is None else (self.codes[rows], self.scale[rows])
        c = torch.stack([codes & 15, codes >> 4], -1).reshape(*codes.shape[:-1], self.BLOCK)
        return ((c.float() - 8) * scale).flatten(-2)[..., :self.cols]

    def dot_outer(self, g: torch.Tensor, x: torch.Tensor, rows: int = 4096) -> float:
        """sum(change * g^T x) for ``g`` (n, out) and ``x`` (n, in), ``rows`` rows of the change at a
        time (an output head's g^T x whole would be its size in float32 again)."""
        return sum(float((self.expand(slice(r, r + rows)) * (g[:, r:r + rows].T @ x)).sum())
                   for r in range(0, g.shape[1], rows))


@torch.no_grad()
def probes_for(model, mods: dict, options: dict[str, dict], importance: dict, progress=None) -> dict:
    """What :func:`fisher_stats` probes per tensor: the weight change of each of its reference types
    (:class:`Change`, a sixth of the tensor's float32 bytes each) and each input rounding its
    candidates imply."""
    tied = model.lm_head.weight is model.model.embed_tokens.weight
    out = {}
    for name, m in mods.items():
        d = {}
        w = m.weight.data.float()
        for ref in reference_types(options[name]):
            q = options[name][ref]
            d[("weight", ref)] = (Change.of(q, w, importance.get(name)), None)
        if isinstance(m, torch.nn.Linear) or tied:
            schemes = {input_scheme(t): t for t in options[name]}  # float16 inputs: too small to matter
            d.update({("input", s): (None, t) for s, t in schemes.items() if s not in (None, "F16")})
        out[name] = d
        if progress:
            progress(len(out))
    return out


SAMPLED_ROWS = 256  # rows of a larger matrix that the diagonal formula quantizes per type (see predicted_kls)


def row_terms(dw2: torch.Tensor, st: FisherStats, product: str | None, lookup: bool,
              rows: torch.Tensor | None = None) -> torch.Tensor:
    """The weights' term of the module note's formula per row ``o`` of ``rows`` (all when None):
    1/2 f_o sum_i E[x_i^2] dW_oi^2, and for an embedding 1/2 sum_i F_oi dW_oi^2 (its row Fisher)."""
    out = torch.zeros(dw2.shape[0])
    if product is not None:
        f = st.out_fisher[product]
        out += 0.5 * (f if rows is None else f[rows]) * (dw2 @ st.input_ms[product])
    if lookup:
        out += 0.5 * ((st.embed if rows is None else st.embed[rows]) * dw2).sum(1)
    return out


def sample_rows(n_rows: int, st: FisherStats, product: str | None, lookup: bool, seed: int = 0):
    """(rows, weights): SAMPLED_ROWS rows drawn with replacement, half in proportion to the row's
    Fisher and half uniformly (a floor on every row's chance), and each row's 1 / (draws x chance),
    so that ``(row_terms(..., rows) * weights).sum()`` is an unbiased estimate of the whole sum."""
    share = torch.zeros(n_rows)
    if product is not None:
        share += st.out_fisher[product] * float(st.input_ms[product].sum())
    if lookup:
        share += st.embed.sum(1)
    p = 0.5 / n_rows + (0.5 * share / share.sum() if float(share.sum()) > 0 else 0.5 / n_rows)
    rows = torch.multinomial(p, SAMPLED_ROWS, replacement=True, generator=torch.Generator().manual_seed(seed))
    return rows, 1.0 / (SAMPLED_ROWS * p[rows])


def predicted_kls(name: str, w: torch.Tensor, options: dict, importance, st: FisherStats, product: str | None,
                  lookup: bool) -> dict[str, float]:
    """Type -> predicted KL (nats per token) of storing ``w`` as each of ``options`` (type -> scheme).

    The weights' term is the diagonal formula's, scaled so that at the reference types it equals the
    exactly probed KL of their changes, the scale interpolated between them in log-log and held
    beyond (the diagonal misses how a change at one position reaches later ones through attention:
    up to 10x either way on value and query matrices); the input's rounding is its own probed KL.
    The two are independent roundings and add.

    A matrix of more than SAMPLED_ROWS rows is quantized only on a sample of its rows (every type
    quantizes a row on its own): the formula's sum is estimated from them, the same rows for every
    type, so that the types compare on equal terms; one quantization of a 1B model's weights per
    type would take minutes each."""
    w = w.float()
    rows, weights = (None, None) if w.shape[0] <= SAMPLED_ROWS else sample_rows(w.shape[0], st, product, lookup)
    part = w if rows is None else w[rows]
    diag = {}
    for t, q in options.items():  # one type's copy at a time
        terms = row_terms((part - q.expand(*q.quantize(part, importance))) ** 2, st, product, lookup, rows)
        diag[t] = float(terms.sum() if weights is None else (terms * weights).sum())
    probed = st.probed.get(name, {})
    # (log diagonal KL, log of probed / diagonal) at each reference type, by increasing diagonal KL
    refs = sorted((math.log(diag[k[1]]), math.log(v / diag[k[1]])) for k, v in probed.items()
                  if k[0] == "weight" and diag[k[1]] > 0 and v > 0)

    def scale(d: float) -> float:
        if not refs or d <= 0:
            return 1.0
        (x0, y0), (x1, y1) = refs[0], refs[-1]
        x = min(max(math.log(d), x0), x1)  # held beyond the references
        return math.exp(y0 if x1 == x0 else y0 + (y1 - y0) * (x - x0) / (x1 - x0))

    return {t: scale(diag[t]) * diag[t] + probed.get(("input", input_scheme(t)), 0.0) for t in options}
